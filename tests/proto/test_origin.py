"""Origin allow-lists: pattern compilation and the 403 verdicts.

Request headers are written by a real h11 client and read back by an h11
server, so ``check_origin`` sees them exactly as the listener will (lower-case
names, duplicates kept in order). No sockets and no event loop here.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.proto.handshake import Rejection
from wsproxy.proto.origin import OriginPolicy, check_origin, check_origin_pattern, compile_origins

Headers = list[tuple[bytes, bytes]]


def received(*origins: bytes) -> Headers:
    """The headers an h11 server reads from an upgrade request carrying these Origin values."""
    headers = [(b"Host", b"example.com"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]
    headers += [(b"Origin", o) for o in origins]
    client = h11.Connection(h11.CLIENT)
    wire = client.send(h11.Request(method=b"GET", target=b"/", headers=headers))
    server = h11.Connection(h11.SERVER)
    server.receive_data(wire)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return list(event.headers)


POLICY = compile_origins(["https://app.example.com", "https://*.example.com", "http://localhost:8080"])


def allowed(policy: OriginPolicy | None, *origins: bytes, allow_missing: bool = True) -> bool:
    return check_origin(policy, allow_missing, received(*origins)) is None


# --- matching ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        b"https://app.example.com",
        b"https://app.example.com:443",  # default port == no port
        b"HTTPS://APP.Example.COM",  # scheme and host are case-insensitive
        b"https://a.example.com",  # wildcard: one label
        b"https://a.b.example.com",  # wildcard: several labels
        b"http://localhost:8080",
        b"HTTP://LOCALHOST:8080",
    ],
)
def test_allowed_origins(origin: bytes) -> None:
    assert allowed(POLICY, origin)


@pytest.mark.parametrize(
    "origin",
    [
        b"http://app.example.com",  # scheme counts
        b"https://app.example.com:8443",  # port counts
        b"https://example.com",  # the wildcard needs at least one label
        b"https://evil-example.com",
        b"https://example.com.evil.net",
        b"https://a.example.com:444",
        b"http://localhost",  # the pattern's port is 8080
        b"http://localhost:80",
        b"null",  # only an explicit "null" entry
        b"https://app.example.com.",  # trailing dot: not the same serialisation
    ],
)
def test_refused_origins(origin: bytes) -> None:
    verdict = check_origin(POLICY, True, received(origin))
    assert isinstance(verdict, Rejection)
    assert verdict.status == 403
    assert origin.decode() in verdict.reason


def test_mismatch_reason_names_the_origin() -> None:
    verdict = check_origin(POLICY, True, received(b"https://evil.example"))
    assert verdict == Rejection(403, "Origin not allowed: https://evil.example")


@pytest.mark.parametrize(
    "origin",
    [
        b"https://app.example.com/",
        b"https://app.example.com/path",
        b"app.example.com",
        b"",
        b"https://",
        b"https://a b",
    ],
)
def test_malformed_origin_is_refused_as_invalid(origin: bytes) -> None:
    verdict = check_origin(POLICY, True, received(origin))
    assert isinstance(verdict, Rejection) and verdict.status == 403
    assert verdict.reason.startswith("invalid Origin header: ")


def test_non_ascii_origin_is_escaped_in_the_reason() -> None:
    verdict = check_origin(POLICY, True, received(b"https://\xe9vil.example"))
    assert isinstance(verdict, Rejection)
    assert "\\xe9vil.example" in verdict.reason


@pytest.mark.parametrize(
    ("pattern", "origin"),
    [
        ("https://a.com", b"https://a.com:443"),
        ("https://a.com:443", b"https://a.com"),
        ("http://a.com", b"http://a.com:80"),
        ("http://a.com:80", b"http://a.com"),
        ("wss://a.com", b"wss://a.com:443"),
        ("ws://a.com:80", b"ws://a.com"),
    ],
)
def test_default_ports_are_the_same_as_no_port(pattern: str, origin: bytes) -> None:
    assert allowed(compile_origins([pattern]), origin)


def test_http_and_https_default_ports_differ() -> None:
    assert not allowed(compile_origins(["https://a.com"]), b"https://a.com:80")
    assert not allowed(compile_origins(["http://a.com"]), b"http://a.com:443")


def test_scheme_without_a_default_port() -> None:
    policy = compile_origins(["chrome-extension://abcdefghijklmnop"])
    assert allowed(policy, b"chrome-extension://abcdefghijklmnop")
    assert not allowed(policy, b"chrome-extension://abcdefghijklmnop:443")


def test_null_origin_needs_an_explicit_entry() -> None:
    assert not allowed(compile_origins(["https://*.example.com"]), b"null")
    assert allowed(compile_origins(["null"]), b"null")
    assert not allowed(compile_origins(["null"]), b"NULL")


def test_ip_literals() -> None:
    policy = compile_origins(["http://[::1]:8080", "http://127.0.0.1:3000"])
    assert allowed(policy, b"http://[::1]:8080")
    assert allowed(policy, b"http://[0:0:0:0:0:0:0:1]:8080")  # compared in canonical form
    assert allowed(policy, b"http://127.0.0.1:3000")
    assert not allowed(policy, b"http://[::1]")
    assert not allowed(policy, b"http://127.0.0.01:3000")


def test_wildcard_does_not_match_ip_addresses() -> None:
    policy = compile_origins(["https://*.example.com"])
    assert not allowed(policy, b"https://1.2.3.4")


def test_wildcard_keeps_scheme_and_port() -> None:
    policy = compile_origins(["https://*.example.com:8443"])
    assert allowed(policy, b"https://a.example.com:8443")
    assert not allowed(policy, b"https://a.example.com")
    assert not allowed(policy, b"http://a.example.com:8443")


def test_empty_list_allows_no_origin() -> None:
    policy = compile_origins([])
    assert not allowed(policy, b"https://a.com")
    assert allowed(policy)  # but a missing Origin, when that is allowed


# --- duplicates, missing, no policy ------------------------------------------------------


def test_duplicated_origin_is_refused() -> None:
    verdict = check_origin(POLICY, True, received(b"https://app.example.com", b"https://evil.example"))
    assert verdict == Rejection(403, "more than one Origin header: https://app.example.com, https://evil.example")


def test_duplicated_origin_is_refused_even_without_a_policy() -> None:
    verdict = check_origin(None, True, received(b"https://a.com", b"https://a.com"))
    assert isinstance(verdict, Rejection) and verdict.status == 403


def test_missing_origin() -> None:
    assert check_origin(POLICY, True, received()) is None
    verdict = check_origin(POLICY, False, received())
    assert verdict == Rejection(403, "missing Origin header (allow_missing_origin is false)")


def test_no_policy_allows_any_origin() -> None:
    assert allowed(None, b"https://anything.example")
    assert allowed(None, b"null")
    assert allowed(None, b"not even an origin")
    assert allowed(None)
    assert not allowed(None, allow_missing=False)  # allow_missing_origin still applies


# --- patterns ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    [
        "https://app.example.com",
        "HTTPS://App.Example.com",
        "https://*.example.com",
        "https://*.example.com:8443",
        "http://localhost:8080",
        "http://[::1]:8080",
        "http://10.0.0.1",
        "null",
        "chrome-extension://abcdef",
        "https://xn--bcher-kva.example",
        "https://_dev.example.com",
    ],
)
def test_valid_patterns(pattern: str) -> None:
    check_origin_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("*", 'leave "origins" out'),
        ("https://app.example.com/", "no path"),
        ("https://app.example.com/chat", "no path"),
        ("https://app.example.com?x", "no path, query or fragment"),
        ("app.example.com", 'expected "scheme://host[:port]"'),
        ("https://", "empty host"),
        ("https://a.*.example.com", "wildcard elsewhere"),
        ("https://app*.example.com", "wildcard elsewhere"),
        ("*://app.example.com", "wildcard elsewhere"),
        ("https://*", "wildcard elsewhere"),
        ("https://*.*.example.com", "wildcard elsewhere"),
        ("https://*.10.0.0.1", "not an IP address"),
        ("https://*.[::1]", "not an IP address"),
        ("https://a.com:0", "invalid port"),
        ("https://a.com:08443", "invalid port"),
        ("https://a.com:65536", "invalid port"),
        ("https://a.com:", "invalid port"),
        ("https://a.com:x", "invalid port"),
        ("https://user@a.com", "no user information"),
        ("https://[::1", 'closing "]"'),
        ("https://[::g]", "invalid IPv6 address"),
        ("https://[fe80::1%eth0]", "zone"),
        ("https://10.0.0.256", "invalid IPv4 address"),
        ("https://010.0.0.1", "invalid IPv4 address"),
        ("https://a..com", "invalid host name"),
        ("https://-a.com", "invalid host name"),
        ("https://a.com.", "invalid host name"),
        ("https://bücher.example", "not ASCII"),
        ("1https://a.com", "invalid scheme"),
        ("https://a com", "invalid host name"),
        (" https://a.com", "invalid scheme"),
    ],
)
def test_invalid_patterns_have_precise_messages(pattern: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        check_origin_pattern(pattern)
    assert message in str(caught.value)
    with pytest.raises(ValueError):
        compile_origins(["https://ok.example.com", pattern])


def test_pattern_message_names_the_pattern() -> None:
    with pytest.raises(ValueError) as caught:
        check_origin_pattern("https://app.example.com/")
    assert "'https://app.example.com/'" in str(caught.value)


def test_policy_keeps_patterns_for_messages() -> None:
    assert POLICY.patterns == ("https://app.example.com", "https://*.example.com", "http://localhost:8080")


# --- properties ----------------------------------------------------------------------

_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(labels=st.lists(_LABEL, min_size=1, max_size=4), sub=st.lists(_LABEL, min_size=1, max_size=3))
def test_wildcard_matches_exactly_the_subdomains(labels: list[str], sub: list[str]) -> None:
    suffix = ".".join(labels) + ".test"
    policy = compile_origins([f"https://*.{suffix}"])
    assert policy.allows(f"https://{'.'.join(sub)}.{suffix}")
    assert policy.allows(f"HTTPS://{'.'.join(sub).upper()}.{suffix}:443")
    assert not policy.allows(f"https://{suffix}")
    assert not policy.allows(f"https://{'.'.join(sub)}{suffix}")


@given(st.binary(max_size=64))
def test_any_header_value_gets_a_verdict(value: bytes) -> None:
    verdict = check_origin(POLICY, True, [(b"origin", value)])
    assert verdict is None or verdict.status == 403
