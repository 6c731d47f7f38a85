"""Fuzz target: the opening handshake checks (wsproxy/proto/handshake.py), with h11 as the oracle.

Input layout: one byte, then a head (``fuzz/make_seeds.py`` writes seeds in it).
Bit 0 of the byte picks the side; on the response side bit 1 offers the
subprotocols ``chat, superchat`` and bit 2 offers ``permessage-deflate`` in the
client request the response answers. The head is taken up to its first blank
line (``\\r\\n\\r\\n`` is appended when there is none), as the proxy reads it.

Request side (client → proxy), the proxy's own order: ``check_raw_head``, then
h11 parses the head, then ``check_upgrade``. Invariants:

- no exception escapes but h11's ``RemoteProtocolError``, whose status hint is 4xx;
- every Rejection is a 4xx;
- h11 fed the head whole and byte by byte sees the same request;
- an accepted upgrade is one wsproto's server accepts too, with the same target;
  its host is the Host header's, lower case and without the port; its path is
  the target before ``?``;
- the request the proxy sends upstream (``upstream_request``/``encode_request``)
  passes ``check_raw_head``, h11 and ``check_upgrade`` again, with the same key,
  host, path, subprotocols and extensions.

Response side (backend → proxy): the strict fast path ``parse_response_head``
against h11 as a client that sent the upgrade. Invariants:

- a head the fast path accepts is accepted by h11, with the same status and
  the same headers, and ``check_upstream_response`` reaches the same verdict
  on both;
- an accepted 101 gives a ``downstream_101`` that the fast path, h11 and
  ``check_upstream_response`` all accept again with the same negotiation.
"""

from __future__ import annotations

import re
import sys

from fuzz._harness import Reader, finding, fuzz_main, instrumented

with instrumented("wsproxy", "h11"):
    import h11
    from wsproxy.proto.target import normalise_target
from wsproxy.proto.handshake import (
    Accepted,
    Rejection,
    Upgrade,
    check_raw_head,
    check_upgrade,
    downstream_101,
)
from wsproxy.proto.upstream_handshake import (
    ResponseHead,
    check_upstream_response,
    encode_request,
    forwarding_headers,
    parse_response_head,
    upstream_request,
)

from wsproto import ConnectionType, WSConnection
from wsproto.events import Request as WsprotoRequest
from wsproto.utilities import RemoteProtocolError as WsprotoError

#: The Sec-WebSocket-Key of the client request on the response side, and its answer.
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def head_of(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data + b"\r\n\r\n" if end < 0 else data[: end + 4]


def _h11_request(head: bytes) -> h11.Request | h11.RemoteProtocolError:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return exc
    if not isinstance(event, h11.Request):
        finding("request-h11-event", f"h11 returned {event!r} for a whole head")
        raise AssertionError("unreachable")
    return event


def _h11_request_bytewise(head: bytes) -> h11.Request | h11.RemoteProtocolError:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
    try:
        for i in range(len(head)):
            conn.receive_data(head[i : i + 1])
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                assert isinstance(event, h11.Request), event
                return event
    except h11.RemoteProtocolError as exc:
        return exc
    raise AssertionError("h11 wanted more than the whole head")


def _same_request(a: h11.Request, b: h11.Request) -> bool:
    return (a.method, a.target, a.http_version, list(a.headers.raw_items())) == (
        b.method, b.target, b.http_version, list(b.headers.raw_items()))


def check_request(head: bytes) -> None:
    rejection = check_raw_head(head)
    if rejection is not None:
        if not 400 <= rejection.status < 500:
            finding("request-status", f"check_raw_head refused with {rejection.status}")
        return
    event = _h11_request(head)
    bytewise = _h11_request_bytewise(head)
    if isinstance(event, h11.RemoteProtocolError) != isinstance(bytewise, h11.RemoteProtocolError) or (
        isinstance(event, h11.Request) and isinstance(bytewise, h11.Request) and not _same_request(event, bytewise)
    ):
        finding("request-h11-split", f"h11 whole vs byte by byte: {event!r} vs {bytewise!r}")
    if isinstance(event, h11.RemoteProtocolError):
        if not 400 <= event.error_status_hint < 500:
            finding("request-status", f"h11 status hint {event.error_status_hint}")
        return
    verdict = check_upgrade(event)
    if isinstance(verdict, Rejection):
        if not 400 <= verdict.status < 500:
            finding("request-status", f"check_upgrade refused with {verdict.status}: {verdict.reason}")
        return
    if not isinstance(verdict, Upgrade):
        finding("request-type", f"check_upgrade returned {type(verdict).__name__}")
        return
    _check_upgrade_fields(event, verdict)
    _check_with_wsproto(head, verdict)
    _check_upstream_request(verdict)


#: RFC 9110 §7.2 / RFC 3986 §3.2.2: Host = uri-host [ ":" port ]; uri-host = IP-literal / IPv4address / reg-name.
_URI_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)


def _check_upgrade_fields(event: h11.Request, up: Upgrade) -> None:
    hosts = [v for n, v in event.headers if n == b"host"]
    if len(hosts) == 1 and not _URI_HOST.fullmatch(hosts[0]):
        finding("request-host-grammar", f"an upgrade with a Host that is not uri-host [\":\" port]: {hosts[0]!r}")
    raw = hosts[0].decode("latin-1").strip().lower() if len(hosts) == 1 else None
    if raw is not None:
        name, colon, port = raw.rpartition(":") if not raw.endswith("]") else (raw, "", "")
        if not colon or not port.isdigit():
            name = raw
        raw = name.rstrip(".") if name.endswith(".") and not name.endswith("..") else name  # one trailing dot
    if raw is None or not (raw == up.host or raw == "[" + up.host + "]"):
        finding("request-host", f"Upgrade.host {up.host!r} from Host {hosts!r}")
    # The path is the normalised target's (proto/target.py), never the raw one.
    normal = normalise_target(event.target)
    expected = normal.split(b"?", 1)[0].decode("latin-1") if isinstance(normal, bytes) else None
    if up.path != expected:
        finding("request-path", f"Upgrade.path {up.path!r} from target {event.target!r} (normalised: {normal!r})")


def _check_with_wsproto(head: bytes, up: Upgrade) -> None:
    # wsproto reads only the last Connection header and wants Upgrade to be exactly
    # "websocket", where RFC 9110 §5.3 allows a list over several lines: ask it only
    # about requests where the two readings cannot differ.
    names = [name for name, _ in up.request.headers]
    upgrades = [value for name, value in up.request.headers if name == b"upgrade"]
    if names.count(b"connection") != 1 or [v.lower() for v in upgrades] != [b"websocket"]:
        return
    server = WSConnection(ConnectionType.SERVER)
    try:
        server.receive_data(head)
        events = list(server.events())
    except UnicodeError:
        return  # wsproto decodes Host as IDNA and raises on other bytes: no verdict from it
    except WsprotoError as exc:
        finding("request-wsproto", f"wsproxy accepts an upgrade wsproto refuses: {exc}")
        return
    if not events or not isinstance(events[0], WsprotoRequest):
        finding("request-wsproto", f"wsproxy accepts an upgrade wsproto answers with {events[:1]!r}")
        return
    if events[0].target != up.request.target.decode("latin-1"):
        finding("request-wsproto", f"targets differ: {events[0].target!r} vs {up.request.target!r}")


def _check_upstream_request(up: Upgrade) -> None:
    host = next((value for name, value in up.request.headers if name == b"host"), b"")
    extra = forwarding_headers("192.0.2.7", 50123, host, tls=False)
    target, headers = upstream_request(up, extra)
    wire = encode_request(target, headers)
    rejection = check_raw_head(wire)
    if rejection is not None:
        finding("upstream-request", f"the proxy's own upstream request fails check_raw_head: {rejection.reason}")
        return
    event = _h11_request(wire)
    if isinstance(event, h11.RemoteProtocolError):
        finding("upstream-request", f"h11 refuses the proxy's upstream request: {event}")
        return
    again = check_upgrade(event)
    if not isinstance(again, Upgrade):
        finding("upstream-request", f"the proxy's upstream request is refused: {again}")
        return
    mine = (up.key, up.host, up.path, up.subprotocols, up.extensions)
    theirs = (again.key, again.host, again.path, again.subprotocols, again.extensions)
    if mine != theirs:
        finding("upstream-request", f"the upstream request changed the upgrade: {mine} vs {theirs}")


# -- response side ------------------------------------------------------------------------


def _client_request(flags: int) -> list[tuple[bytes, bytes]]:
    headers = [(b"Host", b"backend.example"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
               (b"Sec-WebSocket-Key", KEY), (b"Sec-WebSocket-Version", b"13")]
    if flags & 2:
        headers.append((b"Sec-WebSocket-Protocol", b"chat, superchat"))
    if flags & 4:
        headers.append((b"Sec-WebSocket-Extensions", b"permessage-deflate; client_max_window_bits"))
    return headers


def _upgrade(flags: int) -> Upgrade:
    headers = _client_request(flags)
    verdict = check_upgrade(h11.Request(method=b"GET", target=b"/chat", headers=headers))
    assert isinstance(verdict, Upgrade), verdict
    return verdict


def _h11_response(head: bytes, flags: int) -> h11.InformationalResponse | h11.Response | h11.ProtocolError:
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=len(head) + 1)
    conn.send(h11.Request(method=b"GET", target=b"/chat", headers=_client_request(flags)))
    conn.send(h11.EndOfMessage())
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        return exc
    if not isinstance(event, (h11.InformationalResponse, h11.Response)):
        raise AssertionError(f"h11 returned {event!r} for a whole response head")
    return event


def _same_verdict(a: Accepted | Rejection, b: Accepted | Rejection) -> bool:
    if isinstance(a, Rejection) and isinstance(b, Rejection):
        return a.status == b.status
    return a == b


def check_response(head: bytes, flags: int) -> None:
    up = _upgrade(flags)
    fast = parse_response_head(head)
    event = _h11_response(head, flags)
    if fast is None:
        if not isinstance(event, h11.ProtocolError) and event.status_code == 101:
            check_upstream_response(event, up)  # the slow path: only no exception is asked of it
        return
    if not isinstance(fast, ResponseHead):
        finding("response-type", f"parse_response_head returned {type(fast).__name__}")
        return
    if isinstance(event, h11.ProtocolError):
        # The proxy takes the fast path's answer for a 101 only; other heads go to h11 anyway.
        tag = "response-h11" if fast.status_code == 101 else "response-h11-non101"
        finding(tag, f"the fast path accepts a {fast.status_code} head that h11 refuses: {event}")
        return
    if event.status_code != fast.status_code or list(event.headers.raw_items()) != list(fast.raw_headers):
        finding("response-h11", f"fast path and h11 read the head differently: {fast.status_code} "
                                f"{fast.raw_headers!r} vs {event.status_code} {list(event.headers.raw_items())!r}")
        return
    if fast.status_code != 101:
        return  # the proxy lets h11 handle every other answer
    verdict = check_upstream_response(fast, up)
    if not isinstance(event, h11.InformationalResponse):
        raise AssertionError(f"h11 read a 101 as {event!r}")
    slow = check_upstream_response(event, up)
    if not _same_verdict(verdict, slow):
        finding("response-verdict", f"fast path {verdict!r} vs h11 {slow!r}")
        return
    if isinstance(verdict, Accepted):
        _check_downstream_101(verdict, up, flags)


def _check_downstream_101(accepted: Accepted, up: Upgrade, flags: int) -> None:
    wire = downstream_101(accepted)
    again = parse_response_head(wire)
    event = _h11_response(wire, flags)
    if again is None or isinstance(event, h11.ProtocolError):
        finding("downstream-101", f"the client's 101 does not parse: fast path {again!r}, h11 {event!r}")
        return
    for parsed in (again, event):
        verdict = check_upstream_response(parsed, up)
        if not isinstance(verdict, Accepted) or (verdict.subprotocol, verdict.extensions) != (
            accepted.subprotocol, accepted.extensions
        ):
            finding("downstream-101", f"the client's 101 is not the same answer: {verdict!r} vs {accepted!r}")


def test_one_input(data: bytes) -> None:
    r = Reader(data)
    flags = r.byte()
    head = head_of(r.rest())
    if flags & 1:
        check_response(head, flags)
    else:
        check_request(head)


def main() -> None:
    fuzz_main(test_one_input)


if __name__ == "__main__":
    sys.exit(main())
