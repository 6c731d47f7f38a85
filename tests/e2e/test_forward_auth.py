"""Forward authentication against a real auth service on loopback.

The auth service is a tiny trio + h11 HTTP server on port 0 that records every
request it receives and answers as each test tells it to (an answer, raw
bytes, or silence). Upgrades are built the real way: an h11 client writes the
request, an h11 server parses it, ``check_upgrade`` validates it. The pure
parts (the cache, the credentials key) are tested at the end without
sockets; the URL and header-name checks in tests/proto/test_forward_auth.py. What is not here: the session wiring (which route uses
forward auth, how a Denied reaches the client).
"""

from __future__ import annotations

from collections.abc import Sequence

import h11
import pytest
import trio

from tests.kit.authservice import allow, auth_service
from tests.kit.servers import closed_port
from tests.kit.wait import SLACK_S
from wsproxy.config.schema import ForwardAuthConfig
from wsproxy.edge.forward_auth import (
    MAX_DENIAL_BODY_BYTES,
    AllowCache,
    Allowed,
    Denied,
    ForwardAuth,
    credentials_key,
)
from wsproxy.proto.handshake import Rejection, Upgrade, check_upgrade, http_response

#: Bound on every test.
TEST_TIMEOUT_S = 10.0
# --- building upgrades the real way -------------------------------------------------


def make_upgrade(target: bytes = b"/chat?room=1", headers: Sequence[tuple[bytes, bytes]] = ()) -> Upgrade:
    client = h11.Connection(h11.CLIENT)
    data = client.send(
        h11.Request(
            method=b"GET",
            target=target,
            headers=[
                (b"Host", b"chat.example.com"),
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade"),
                (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                (b"Sec-WebSocket-Version", b"13"),
                (b"Origin", b"https://chat.example.com"),
                *headers,
            ],
        )
    )
    server = h11.Connection(h11.SERVER)
    server.receive_data(data or b"")
    request = server.next_event()
    assert isinstance(request, h11.Request)
    upgrade = check_upgrade(request)
    assert isinstance(upgrade, Upgrade), upgrade
    return upgrade


def forward_auth(url: str, *, max_cache_entries: int = 10000, **changes: object) -> ForwardAuth:
    settings: dict[str, object] = {
        "send_headers": ("Cookie", "Authorization"),
        "copy_headers": ("X-User",),
        "timeout_s": 2.0,
        "cache_s": 30.0,
        **changes,
    }
    return ForwardAuth(ForwardAuthConfig(url=url, **settings), max_cache_entries=max_cache_entries)  # type: ignore[arg-type]


async def check(auth: ForwardAuth, upgrade: Upgrade | None = None, *, tls: bool = False) -> Allowed | Denied | Rejection:
    return await auth.check(
        upgrade or make_upgrade(headers=[(b"Cookie", b"session=abc")]),
        client_ip="203.0.113.9",
        host_header=b"chat.example.com",
        tls=tls,
    )


def credentials(value: bytes) -> Upgrade:
    return make_upgrade(headers=[(b"Authorization", b"Bearer " + value)])


# --- allow and deny ----------------------------------------------------------------


async def test_allow_copies_only_the_copy_headers() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        reply = allow((b"x-user", b"alice"), (b"X-Role", b"admin"), (b"X-User", b"alice2"), (b"Set-Cookie", b"a=b"))
        async with auth_service(reply) as service:
            verdict = await check(forward_auth(service.url()))
    assert verdict == Allowed([(b"X-User", b"alice"), (b"X-User", b"alice2")])


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ([(b"X-User", b"alice")], "alice"),
        ([(b"x-user", "Zoë Ä".encode())], "Zoë Ä"),  # UTF-8, inner spaces kept
        ([], "exactly one X-User header (got 0)"),
        ([(b"X-User", b"a"), (b"X-User", b"b")], "exactly one X-User header (got 2)"),
        ([(b"X-User", b"")], "an empty or padded X-User header"),
        ([(b"X-User", b"\xff\xfe")], "X-User header that is not UTF-8"),
    ],
)
async def test_identity_from_a_header_of_the_allow(answer: list[tuple[bytes, bytes]], expected: str) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(allow(*answer)) as service:
            verdict = await check(forward_auth(service.url(), identity_from="X-User", copy_headers=()))
    if isinstance(verdict, Rejection):
        assert verdict.status == 503 and verdict.reason.endswith(expected), verdict
        assert "\xff" not in verdict.reason and "alice" not in verdict.reason
    else:
        assert verdict == Allowed([], expected)


def test_identity_from_must_be_a_header_name() -> None:
    with pytest.raises(ValueError, match="identity_from: 'X User' is not a header name"):
        forward_auth("http://127.0.0.1:1/", identity_from="X User")


@pytest.mark.parametrize("status", [200, 204])
async def test_any_2xx_allows(status: int) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(lambda request: (status, [], b"")) as service:
            verdict = await check(forward_auth(service.url()))
    assert verdict == Allowed([])


async def test_deny_401_passes_status_www_authenticate_and_body() -> None:
    answer = (401, [(b"WWW-Authenticate", b'Bearer realm="chat"'), (b"Content-Type", b"text/plain"), (b"X-Debug", b"no")], b"log in first\n")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(lambda request: answer) as service:
            verdict = await check(forward_auth(service.url()))
    assert isinstance(verdict, Denied)
    assert verdict.status == 401
    assert verdict.headers == [(b"WWW-Authenticate", b'Bearer realm="chat"'), (b"Content-Type", b"text/plain")]
    assert verdict.body == b"log in first\n"
    assert "401" in verdict.reason
    response = http_response(verdict.status, verdict.headers, verdict.body)
    assert response.startswith(b"HTTP/1.1 401 ") and response.endswith(b"\r\n\r\nlog in first\n")


async def test_deny_403() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(lambda request: (403, [], b"go away")) as service:
            verdict = await check(forward_auth(service.url()))
    assert isinstance(verdict, Denied)
    assert (verdict.status, verdict.headers, verdict.body) == (403, [], b"go away")


async def test_denial_body_is_bounded() -> None:
    big = b"x" * (MAX_DENIAL_BODY_BYTES + 5000)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(lambda request: (401, [], big)) as service:
            verdict = await check(forward_auth(service.url()))
    assert isinstance(verdict, Denied)
    assert verdict.body == big[:MAX_DENIAL_BODY_BYTES]


async def test_close_delimited_denial_body() -> None:
    raw = b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\nnot you"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(lambda request: raw) as service:
            verdict = await check(forward_auth(service.url()))
    assert isinstance(verdict, Denied)
    assert (verdict.status, verdict.body) == (403, b"not you")


# --- the auth service failing -------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 302, 404, 407])
async def test_other_answers_are_503(status: int) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(lambda request: (status, [(b"X-User", b"alice")], b"oops")) as service:
            verdict = await check(forward_auth(service.url()))
    assert isinstance(verdict, Rejection)
    assert verdict.status == 503
    assert f"answered {status}" in verdict.reason


async def test_silent_auth_service_gives_503_after_the_timeout() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(lambda request: None) as service:
            start = trio.current_time()
            verdict = await check(forward_auth(service.url(), timeout_s=0.5))
            elapsed = trio.current_time() - start
    assert isinstance(verdict, Rejection)
    assert verdict.status == 503
    assert "did not answer within 0.5s" in verdict.reason
    assert 0.5 <= elapsed < 0.5 + SLACK_S
    assert len(service.requests) == 1


async def test_refused_port_gives_503() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        verdict = await check(forward_auth(f"http://127.0.0.1:{closed_port()}/auth"))
    assert isinstance(verdict, Rejection)
    assert verdict.status == 503
    assert "connect failed" in verdict.reason


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "without answering"),
        (b"HTTP/1.1 200 OK\r\nX-User: ", "without answering"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "invalid HTTP"),
    ],
)


async def test_broken_answers_give_503(raw: bytes, reason: str) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(lambda request: raw) as service:
            verdict = await check(forward_auth(service.url()))
    assert isinstance(verdict, Rejection)
    assert verdict.status == 503
    assert reason in verdict.reason


# --- the subrequest -----------------------------------------------------------------


async def test_the_subrequest_the_auth_service_receives() -> None:
    upgrade = make_upgrade(
        b"/chat/room?id=7&x=%20y",
        [(b"Cookie", b"session=abc"), (b"X-Other", b"secret"), (b"authorization", b"Bearer t0k"), (b"Cookie", b"theme=dark")],
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(allow()) as service:
            verdict = await check(forward_auth(service.url("/v1/auth?scope=ws")), upgrade, tls=True)
    assert isinstance(verdict, Allowed)
    [request] = service.requests
    assert request.method == b"GET"
    assert request.target == b"/v1/auth?scope=ws"
    assert request.http_version == b"1.1"
    assert list(request.headers) == [
        (b"host", b"127.0.0.1:%d" % service.port),
        (b"x-forwarded-method", b"GET"),
        (b"x-forwarded-uri", b"/chat/room?id=7&x=%20y"),
        (b"x-forwarded-for", b"203.0.113.9"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"chat.example.com"),
        (b"cookie", b"session=abc"),
        (b"cookie", b"theme=dark"),
        (b"authorization", b"Bearer t0k"),
        (b"connection", b"close"),
    ]


async def test_no_credentials_no_send_headers() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(allow()) as service:
            await check(forward_auth(service.url()), make_upgrade(b"/"))
    [request] = service.requests
    names = {name for name, _ in request.headers}
    assert names == {b"host", b"x-forwarded-method", b"x-forwarded-uri", b"x-forwarded-for",
                     b"x-forwarded-proto", b"x-forwarded-host", b"connection"}
    assert dict(request.headers)[b"x-forwarded-proto"] == b"http"


async def test_auth_service_by_name() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(allow((b"X-User", b"bob"))) as service:
            verdict = await check(forward_auth(service.url(host="localhost")))
    assert verdict == Allowed([(b"X-User", b"bob")])
    assert dict(service.requests[0].headers)[b"host"] == b"localhost:%d" % service.port


# --- the cache ----------------------------------------------------------------------


async def test_allow_is_cached_until_it_expires() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(allow((b"X-User", b"alice"))) as service:
            auth = forward_auth(service.url(), cache_s=0.3)
            first = await check(auth, credentials(b"a"))
            second = await check(auth, credentials(b"a"))
            assert len(service.requests) == 1
            assert first == second == Allowed([(b"X-User", b"alice")])
            assert (auth.cache_hits, auth.cache_misses) == (1, 1)
            await trio.sleep(0.4)
            await check(auth, credentials(b"a"))
    assert len(service.requests) == 2
    assert (auth.cache_hits, auth.cache_misses) == (1, 2)


async def test_different_credentials_are_separate_entries() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        users = {b"Bearer a": b"alice", b"Bearer b": b"bob"}
        reply = lambda request: (200, [(b"X-User", users[dict(request.headers)[b"authorization"]])], b"")  # noqa: E731
        async with auth_service(reply) as service:
            auth = forward_auth(service.url())
            verdicts = [await check(auth, credentials(v)) for v in (b"a", b"b", b"a", b"b")]
    assert len(service.requests) == 2
    assert verdicts == [Allowed([(b"X-User", b"alice")]), Allowed([(b"X-User", b"bob")])] * 2
    assert (auth.cache_hits, auth.cache_misses) == (2, 2)


@pytest.mark.parametrize("status", [401, 403, 500])
async def test_denials_and_errors_are_not_cached(status: int) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(lambda request: (status, [], b"")) as service:
            auth = forward_auth(service.url())
            for _ in range(3):
                await check(auth, credentials(b"a"))
    assert len(service.requests) == 3
    assert (auth.cache_hits, auth.cache_misses) == (0, 3)


async def test_cache_is_bounded_lru() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(allow()) as service:
            auth = forward_auth(service.url(), max_cache_entries=2)
            for value in (b"a", b"b", b"a", b"c"):  # a is used again, so c evicts b
                await check(auth, credentials(value))
            assert len(service.requests) == 3
            assert len(auth.cache) == 2
            await check(auth, credentials(b"a"))  # still cached
            assert len(service.requests) == 3
            await check(auth, credentials(b"b"))  # evicted
            assert len(service.requests) == 4
    assert len(auth.cache) == 2


async def test_cache_off() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with auth_service(allow()) as service:
            auth = forward_auth(service.url(), cache_s=0.0)
            for _ in range(2):
                await check(auth, credentials(b"a"))
    assert len(service.requests) == 2
    assert (auth.cache_hits, auth.cache_misses, len(auth.cache)) == (0, 2, 0)


# --- the pure parts -----------------------------------------------------------------


def test_credentials_key_is_a_digest_of_the_send_headers_only() -> None:
    names = (b"Cookie", b"Authorization")
    key = credentials_key(credentials(b"s3cret-token"), names)
    assert len(key) == 32 and b"s3cret" not in key
    assert key == credentials_key(credentials(b"s3cret-token"), names)
    assert key != credentials_key(credentials(b"other"), names)
    with_other = make_upgrade(b"/elsewhere", [(b"Authorization", b"Bearer s3cret-token"), (b"X-Other", b"1")])
    assert key == credentials_key(with_other, names)
    # The same bytes split differently between two headers give different keys.
    one = make_upgrade(headers=[(b"Cookie", b"a"), (b"Authorization", b"bc")])
    two = make_upgrade(headers=[(b"Cookie", b"ab"), (b"Authorization", b"c")])
    assert credentials_key(one, names) != credentials_key(two, names)


def test_allow_cache_expiry_and_lru() -> None:
    cache = AllowCache(2, ttl_s=10.0)
    a, b, c = Allowed([(b"X-User", b"a")]), Allowed([]), Allowed([])
    cache.put(b"a", a, now=100.0)
    assert cache.get(b"a", now=109.9) is a
    assert cache.get(b"a", now=110.0) is None
    assert len(cache) == 0
    cache.put(b"a", a, now=0.0)
    cache.put(b"b", b, now=0.0)
    assert cache.get(b"a", now=1.0) is a
    cache.put(b"c", c, now=1.0)
    assert (cache.get(b"a", 2.0), cache.get(b"b", 2.0), cache.get(b"c", 2.0)) == (a, None, c)
    disabled = AllowCache(0, ttl_s=10.0)
    disabled.put(b"a", a, now=0.0)
    assert disabled.get(b"a", now=0.0) is None and not disabled.enabled


def test_forward_auth_refuses_https() -> None:
    with pytest.raises(ValueError, match="https:// auth services are not supported yet"):
        forward_auth("https://127.0.0.1:9100/auth")
