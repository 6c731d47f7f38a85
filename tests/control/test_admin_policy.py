"""Pure tests of the admin listener's Host, Origin and path checks (``control.admin_policy``).

Requests are written by a real h11 client and read back by an h11 server, so
the headers reach ``check_request`` exactly as the admin listener sees them
(names lower-cased, values stripped). No event loop, no sockets.
"""

from __future__ import annotations

from collections.abc import Sequence

import h11
import pytest

from wsproxy.control.admin_policy import AdminSite, Refusal, check_request, parse_authority, path_segments

LOOPBACK = AdminSite.for_tcp([("127.0.0.1", 9090)], "127.0.0.1")
V6 = AdminSite.for_tcp([("::1", 9090)], "::1")
NAMED = AdminSite.for_tcp([("127.0.0.1", 9090)], "Admin.Internal")  # bind: admin.internal:9090
WILDCARD = AdminSite.for_tcp([("0.0.0.0", 9090)], "0.0.0.0")
UNIX = AdminSite.for_unix()
DRAIN = b"/pools/main/backends/127.0.0.1%3A9001/drain"


def request(method: str, headers: Sequence[tuple[str, str]], target: bytes = b"/status", http: bytes = b"1.1") -> h11.Request:
    """``headers`` as an h11 client sends them and an h11 server parses them."""
    client, server = h11.Connection(h11.CLIENT), h11.Connection(h11.SERVER)
    headers = [*headers, *([("Content-Length", "0")] if method == "POST" else [])]
    if http == b"1.1":
        wire = client.send(h11.Request(method=method, target=target, headers=headers)) or b""
    else:  # h11 only writes HTTP/1.1: an HTTP/1.0 request (which may omit Host) by hand
        lines = [b"%s %s HTTP/%s" % (method.encode(), target, http), *(f"{n}: {v}".encode() for n, v in headers)]
        wire = b"\r\n".join(lines) + b"\r\n\r\n"
    server.receive_data(wire)
    event = server.next_event()
    assert isinstance(event, h11.Request), event
    return event


def verdict(site: AdminSite, method: str, headers: Sequence[tuple[str, str]]) -> int | None:
    req = request(method, headers)
    refusal = check_request(site, req.method, req.headers)
    return None if refusal is None else refusal.status


# -- Host ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1:9090", "localhost:9090", "LocalHost:9090", "[::1]:9090", "[0:0:0:0:0:0:0:1]:9090"],
)
def test_loopback_names_with_the_bound_port_are_accepted(host: str) -> None:
    assert verdict(LOOPBACK, "GET", [("Host", host)]) is None
    assert verdict(V6, "GET", [("Host", host)]) is None


@pytest.mark.parametrize(
    "host",
    [
        "rebind.attacker.example:9090",  # DNS rebinding: the attacker's name, now pointing at 127.0.0.1
        "rebind.attacker.example",
        "127.0.0.1:9091",  # another port
        "127.0.0.1",  # port 80
        "localhost.:9090",  # a different name for the browser, so a different origin
        "10.0.0.5:9090",
    ],
)
def test_any_other_host_is_misdirected(host: str) -> None:
    assert verdict(LOOPBACK, "GET", [("Host", host)]) == 421
    assert verdict(LOOPBACK, "POST", [("Host", host)]) == 421


def test_the_421_says_which_names_are_served() -> None:
    req = request("GET", [("Host", "rebind.attacker.example:9090")])
    refusal = check_request(LOOPBACK, req.method, req.headers)
    assert refusal == Refusal(
        421, "misdirected request: the Host is not this admin listener (127.0.0.1:9090, [::1]:9090, localhost:9090)"
    )


def test_the_name_bind_gave_is_accepted_case_insensitively() -> None:
    assert verdict(NAMED, "GET", [("Host", "admin.internal:9090")]) is None
    assert verdict(NAMED, "GET", [("Host", "ADMIN.internal:9090")]) is None
    assert verdict(NAMED, "GET", [("Host", "other.internal:9090")]) == 421


def test_a_wildcard_bind_accepts_ip_literals_with_its_port_but_no_names() -> None:
    assert verdict(WILDCARD, "GET", [("Host", "10.1.2.3:9090")]) is None
    assert verdict(WILDCARD, "GET", [("Host", "[2001:db8::7]:9090")]) is None
    assert verdict(WILDCARD, "GET", [("Host", "localhost:9090")]) is None
    assert verdict(WILDCARD, "GET", [("Host", "10.1.2.3:9091")]) == 421
    assert verdict(WILDCARD, "GET", [("Host", "rebind.attacker.example:9090")]) == 421


def test_missing_several_or_malformed_host() -> None:
    req = request("GET", [], http=b"1.0")  # HTTP/1.0 may omit Host; h11 requires it for 1.1
    assert check_request(LOOPBACK, req.method, req.headers) == Refusal(
        421, "misdirected request: no Host header; this admin listener answers to 127.0.0.1:9090, [::1]:9090, localhost:9090"
    )
    # h11 itself refuses two Host headers (400 before the policy runs); the policy does not rely on it.
    twice = [(b"host", b"127.0.0.1:9090"), (b"host", b"127.0.0.1:9090")]
    assert check_request(LOOPBACK, b"GET", twice) == Refusal(400, "several Host headers")
    for host in (b"[::1:9090", b"127.0.0.1:90x", b"127.0.0.1:999999", b"a b:9090", b"[evil]:9090", "h\u00e9:9090".encode()):
        assert check_request(LOOPBACK, b"GET", [(b"host", host)]) == Refusal(400, "invalid Host header"), host


def test_a_unix_socket_accepts_any_host_or_none() -> None:
    assert verdict(UNIX, "GET", [("Host", "whatever.example")]) is None
    req = request("GET", [], http=b"1.0")
    assert check_request(UNIX, req.method, req.headers) is None
    assert verdict(UNIX, "POST", [("Host", "localhost")]) is None


# -- Origin and Sec-Fetch-Site on state-changing requests -----------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [("Origin", "http://evil.example")],
        [("Origin", "http://127.0.0.1:9091")],
        [("Origin", "https://127.0.0.1:9090")],  # the admin does no TLS: not its origin
        [("Origin", "null")],  # sandboxed frames, data: URLs
        [("Origin", "http://127.0.0.1:9090/")],  # not an origin
        [("Origin", "http://127.0.0.1:9090"), ("Origin", "http://evil.example")],
        [("Sec-Fetch-Site", "cross-site")],
        [("Sec-Fetch-Site", "same-site")],
        [("Origin", "http://127.0.0.1:9090"), ("Sec-Fetch-Site", "cross-site")],
    ],
)
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_cross_origin_state_changing_requests_are_forbidden(extra: list[tuple[str, str]], method: str) -> None:
    assert verdict(LOOPBACK, method, [("Host", "127.0.0.1:9090"), *extra]) == 403


@pytest.mark.parametrize(
    "extra",
    [
        [],  # curl, scripts: not a browser
        [("Origin", "http://127.0.0.1:9090"), ("Sec-Fetch-Site", "same-origin")],  # the status page
        [("Origin", "http://localhost:9090"), ("Sec-Fetch-Site", "same-origin")],
        [("Origin", "http://[::1]:9090")],
        [("Sec-Fetch-Site", "none")],  # typed by the user
        [("Sec-Fetch-Site", "Same-Origin")],
    ],
)
def test_same_origin_and_non_browser_requests_may_change_state(extra: list[tuple[str, str]]) -> None:
    assert verdict(LOOPBACK, "POST", [("Host", "127.0.0.1:9090"), *extra]) is None


def test_reads_are_not_checked_for_origin() -> None:
    # A cross-origin page cannot read the answer (no CORS headers are ever sent); the Host rule stops rebinding.
    headers = [("Host", "127.0.0.1:9090"), ("Origin", "http://evil.example"), ("Sec-Fetch-Site", "cross-site")]
    assert verdict(LOOPBACK, "GET", headers) is None
    assert verdict(LOOPBACK, "HEAD", headers) is None


def test_unix_socket_origin_must_match_the_host_it_was_asked_by() -> None:
    assert verdict(UNIX, "POST", [("Host", "admin.example"), ("Origin", "https://admin.example")]) is None
    assert verdict(UNIX, "POST", [("Host", "admin.example"), ("Origin", "http://evil.example")]) == 403
    assert verdict(UNIX, "POST", [("Host", "admin.example"), ("Sec-Fetch-Site", "cross-site")]) == 403
    req = request("POST", [("Origin", "http://evil.example")], http=b"1.0")
    assert check_request(UNIX, req.method, req.headers) == Refusal(
        403, "cross-origin request refused: the Origin is not this admin listener"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"127.0.0.1:9090", ("127.0.0.1", 9090)),
        (b"[::1]:9090", ("::1", 9090)),
        (b"[::1]", ("::1", 80)),
        (b"LOCALHOST:", ("localhost", 80)),
        (b"::1", None),  # IPv6 needs brackets
        (b"h:65536", None),
        (b"[::1]x", None),
        (b"", None),
    ],
)
def test_parse_authority(value: bytes, expected: tuple[str, int] | None) -> None:
    assert parse_authority(value) == expected


# -- path segments ---------------------------------------------------------------------------------


def test_segments_are_percent_decoded_and_an_encoded_slash_stays_inside() -> None:
    assert path_segments(DRAIN) == ["pools", "main", "backends", "127.0.0.1:9001", "drain"]
    assert path_segments(b"/pools/a%2Fb/x?q=1#f") == ["pools", "a/b", "x"]
    assert path_segments(b"/pools/%20event%3Dforged/x") == ["pools", " event=forged", "x"]  # legal; logged quoted


@pytest.mark.parametrize("escape", [b"%0A", b"%0d", b"%00", b"%1F", b"%7F", b"%09", b"%1b"])
def test_a_control_character_in_a_segment_is_400(escape: bytes) -> None:
    assert path_segments(b"/pools/main" + escape + b"event=forged/backends/x/drain") == Refusal(
        400, "control character in the request path"
    )


def test_a_segment_that_is_not_utf8_is_400() -> None:
    assert path_segments(b"/pools/%ff/x") == Refusal(400, "invalid percent-encoding in the request target")
