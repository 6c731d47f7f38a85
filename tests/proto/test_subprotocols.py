"""The route's subprotocol policy and the subprotocol match key. No I/O here."""

from __future__ import annotations

import pytest

from wsproxy.config.schema import PoolName, RouteConfig
from wsproxy.proto.handshake import Rejection, choose_subprotocols, offered_subprotocols, with_subprotocols
from wsproxy.proto.routing import Router


@pytest.mark.parametrize(
    ("offer", "allowed", "required", "expected"),
    [
        (("chat.v1", "chat.v2"), None, False, ("chat.v1", "chat.v2")),  # no policy: as offered
        ((), None, False, ()),
        ((), ("chat.v2",), False, ()),  # an empty offer passes unless required
        (("chat.v3", "chat.v2", "chat.v1"), ("chat.v1", "chat.v2"), False, ("chat.v2", "chat.v1")),  # client's order
        (("mqtt",), ("mqtt", "mqttv3.1"), True, ("mqtt",)),
        (("Chat.V1",), ("chat.v1",), False, None),  # RFC 6455 §11.3.4: case-sensitive
        (("chat.v3",), ("chat.v1", "chat.v2"), False, None),
        (("chat.v3",), (), False, None),  # [] allows no subprotocol at all
        ((), (), False, ()),
        ((), ("chat.v1",), True, None),
        ((), None, True, None),
        (("x",), None, True, ("x",)),
    ],
)
def test_choose_subprotocols(
    offer: tuple[str, ...], allowed: tuple[str, ...] | None, required: bool, expected: tuple[str, ...] | None
) -> None:
    verdict = choose_subprotocols(offer, allowed, required=required)
    if expected is None:
        assert isinstance(verdict, Rejection) and verdict.status == 400
    else:
        assert verdict == expected


def test_refusal_reasons_name_the_policy_never_the_offer() -> None:
    secret = "access_token.s3cr3t"
    refused = choose_subprotocols(("chat.v9", secret), ("chat.v1", "chat.v2"), required=False)
    assert isinstance(refused, Rejection)
    assert refused.reason == "none of the 2 offered subprotocol(s) is allowed on this route (allowed: chat.v1, chat.v2)"
    empty = choose_subprotocols((), ("chat.v1",), required=True)
    assert isinstance(empty, Rejection)
    assert empty.reason == "no subprotocol offered; the route requires one (allowed: chat.v1)"
    nothing = choose_subprotocols(("chat.v1",), (), required=False)
    assert isinstance(nothing, Rejection) and nothing.reason.endswith("(allowed: none)")


def test_offered_subprotocols_reads_every_header_in_order() -> None:
    headers = [
        (b"Host", b"x"),
        (b"Sec-WebSocket-Protocol", b"a, b"),
        (b"X-Other", b"c"),
        (b"sec-websocket-protocol", b" c ,, d "),
    ]
    assert offered_subprotocols(headers) == ("a", "b", "c", "d")
    assert offered_subprotocols([(b"Host", b"x")]) == ()


def test_with_subprotocols_writes_one_header_where_the_first_was() -> None:
    headers = [
        (b"Host", b"x"),
        (b"Sec-WebSocket-Protocol", b"a, b"),
        (b"X-Other", b"c"),
        (b"sec-websocket-protocol", b"c"),
    ]
    assert with_subprotocols(headers, ("b", "c")) == [(b"Host", b"x"), (b"Sec-WebSocket-Protocol", b"b, c"), (b"X-Other", b"c")]
    assert with_subprotocols(headers, ()) == [(b"Host", b"x"), (b"X-Other", b"c")]


def route(pool: str, path: str = "/", subprotocol: str | None = None) -> RouteConfig:
    return RouteConfig(path=path, pool=PoolName(pool), subprotocol=subprotocol)


def test_a_route_matches_on_an_offered_subprotocol() -> None:
    router = Router(
        (
            route("modern", "/graphql", "graphql-transport-ws"),
            route("legacy", "/graphql", "graphql-ws"),
            route("other", "/graphql"),
        )
    )

    def pool(offer: tuple[str, ...], path: str = "/graphql") -> str | None:
        chosen = router.match("example.com", path, offer)
        return None if chosen is None else chosen.pool

    assert pool(("graphql-transport-ws",)) == "modern"
    assert pool(("graphql-ws",)) == "legacy"
    assert pool(("graphql-ws", "graphql-transport-ws")) == "modern"  # first match wins, not the client's order
    assert pool(()) == "other"
    assert pool(("GraphQL-WS",)) == "other"  # names are case-sensitive
    assert pool(("graphql-ws",), "/elsewhere") is None
    assert router.match("example.com", "/graphql") is router.routes[2]  # no offer given: none offered


def test_no_route_for_a_subprotocol_is_404() -> None:
    router = Router((route("v1", "/chat", "chat.v1"),))
    verdict = router.route("example.com", "/chat", ("chat.v2",))
    assert isinstance(verdict, Rejection) and verdict.status == 404
    assert router.route("example.com", "/chat", ("chat.v2", "chat.v1")) is router.routes[0]


def test_path_parameters_are_judged_with_the_same_offer() -> None:
    router = Router((route("v1", "/admin", "chat.v1"), route("rest", "/")))
    # With the offer, /admin;x would route to v1 once its parameters are dropped: refused.
    verdict = router.route("example.com", "/admin;x", ("chat.v1",))
    assert isinstance(verdict, Rejection) and verdict.status == 400
    # Without it, both forms go to "rest": fine.
    assert router.route("example.com", "/admin;x", ()) is router.routes[1]
