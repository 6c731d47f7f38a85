"""Request-target and Host normalisation (RFC 3986 §6.2.2). No I/O here.

Examples first (each spelling of issue 15's bypasses among them), then
properties over generated targets: normalisation is idempotent, never leaves
an empty, "." or ".." segment, and what it accepts decodes (as a backend
decodes, RFC 3986 §2.1) to the same path as the input, dot segments resolved.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from wsproxy.proto.handshake import Rejection
from wsproxy.proto.target import normalise_host, normalise_path, normalise_target, without_path_parameters


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        # issue 15 item 2: each spelling of /admin that reached the open "/" route
        (b"/%61dmin", b"/admin"),
        (b"//admin", b"/admin"),
        (b"/x/../admin", b"/admin"),
        (b"/%2e%2e/admin/../admin", None),  # ".." above the root
        (b"/x/%2E%2E/admin", b"/admin"),
        (b"/x/.%2e/admin", b"/admin"),
        (b"/./admin", b"/admin"),
        (b"///admin//ws", b"/admin/ws"),
        # percent-encoding: unreserved decoded, the rest upper-case
        (b"/%7Euser/%2D%2E%5F", b"/~user/-._"),
        (b"/caf%c3%a9", b"/caf%C3%A9"),
        (b"/a%3bb", b"/a%3Bb"),  # an escaped sub-delim stays escaped: it differs from ";"
        (b"/a%25", b"/a%25"),
        (b"/%41%5a%30", b"/AZ0"),
        # raw bytes a path may not hold get their one spelling, escaped
        (b'/a"b', b"/a%22b"),
        (b"/a{b}|c^", b"/a%7Bb%7D%7Cc%5E"),
        (b"/\xc3\xa9", b"/%C3%A9"),
        # dot segments and trailing slashes (RFC 3986 §5.2.4)
        (b"/a/.", b"/a/"),
        (b"/a/b/..", b"/a/"),
        (b"/a/..", b"/"),
        (b"/a/../", b"/"),
        (b"/a/./b/../c/", b"/a/c/"),
        (b"/.well-known/x", b"/.well-known/x"),
        (b"/a..b/...", b"/a..b/..."),  # not dot segments
        (b"/", b"/"),
        (b"//", b"/"),
        # path parameters are part of their segment
        (b"/admin;x", b"/admin;x"),
        (b"/admin/;x", b"/admin/;x"),
        (b"/public/..;/admin", b"/public/..;/admin"),
        # the query is not touched, whatever it holds
        (b"/a?x=%2f&y=../%61", b"/a?x=%2f&y=../%61"),
        (b"//a/./b?q=//", b"/a/b?q=//"),
        (b"/%61?", b"/a?"),
        # refused
        (b"/admin%2f", None),
        (b"/admin%2F..", None),
        (b"/a%5cb", None),
        (b"/a%00", None),
        (b"/a\\b", None),
        (b"/a\x01b", None),
        (b"/a\x7f", None),
        (b"/..", None),
        (b"/a/../..", None),
        (b"/%", None),
        (b"/%2", None),
        (b"/%zz", None),
        (b"/a#frag", None),
        (b"/a?b#frag", None),
    ],
)
def test_normalise_target(raw: bytes, normal: bytes | None) -> None:
    result = normalise_target(raw)
    if normal is None:
        assert isinstance(result, Rejection) and result.status == 400
        assert raw.decode("latin-1") not in result.reason  # the reason never quotes the target
    else:
        assert result == normal


@pytest.mark.parametrize("target", [b"/", b"/chat", b"/chat/room-1/x_y~z", b"/a/b/?token=abc%2F", b"/a:b@c!$&'()*+,;=/"])
def test_a_normal_target_is_returned_as_it_is(target: bytes) -> None:
    """The handshake's common case: no rebuild, the same object back."""
    assert normalise_target(target) is target


def test_a_target_normalised_only_in_its_query_is_the_same_object() -> None:
    target = b"/.well-known/ws?x=%2e%2e"
    assert normalise_target(target) is target


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        ("secure.example.com", "secure.example.com"),
        ("secure.example.com.", "secure.example.com"),  # issue 15: the trailing dot
        ("Secure.Example.COM", "secure.example.com"),
        ("LOCALHOST.", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("my_host-1", "my_host-1"),
        ("secure.example.com..", None),  # one dot only: two is an empty label
        ("a..b", None),
        (".a", None),
        (".", None),
        ("", None),
        ("secure%2eexample.com", None),
        ("a b", None),
        ("a`b", None),
        ("caf\xe9.example", None),
        ("a;b", None),
    ],
)
def test_normalise_host(host: str, normal: str | None) -> None:
    assert normalise_host(host) == normal


@pytest.mark.parametrize(
    ("path", "bare"),
    [
        ("/admin;x", "/admin"),
        ("/admin;x=1/ws;y", "/admin/ws"),
        ("/public/..;/admin", "/admin"),
        ("/..;/admin", None),
        ("/a;b", "/a"),
        ("/;x", "/"),
        ("/chat", "/chat"),
    ],
)
def test_without_path_parameters(path: str, bare: str | None) -> None:
    assert without_path_parameters(path) == bare


# --- properties ------------------------------------------------------------------------------

#: Pieces of paths, chosen to meet every rule: escapes of unreserved and reserved
#: characters in both cases, dots escaped and not, parameters, bytes a path may
#: not hold raw, and the refused ones.
PIECES = st.sampled_from(
    [
        "a", "B", "~", "-", "_", ".", "..", "%2e", "%2E", "%61", "%7e", "%7E", "%3b", "%3B", ";", "=", "%c3", "%A9",
        "%25", "%20", '"', "{", "\xe9", "@", ":", "%2f", "%5C", "%00", "\\", "%", "%g1",
    ]
)
SEGMENTS = st.lists(PIECES, max_size=4).map("".join)
PATHS = st.lists(st.one_of(SEGMENTS, st.just("")), min_size=1, max_size=8).map(lambda s: "/" + "/".join(s))


def _reference(path: bytes) -> bytes | None:
    """What a backend makes of ``path``: every escape decoded, then dot segments
    resolved and empty segments merged; None where the proxy must refuse."""
    lowered = path.lower()
    if b"\\" in path or b"%2f" in lowered or b"%5c" in lowered or b"%00" in lowered:
        return None
    decoded = unquote_to_bytes(path)
    kept: list[bytes] = []
    trailing = False
    for segment in decoded.split(b"/")[1:]:
        trailing = segment in (b"", b".", b"..")
        if segment == b"..":
            if not kept:
                return None
            kept.pop()
        elif segment not in (b"", b"."):
            kept.append(segment)
    return b"/" + b"/".join(kept) + (b"/" if trailing and kept else b"")


@settings(max_examples=2000, deadline=None)
@given(PATHS)
@example("/%2e%2e")
@example("/a/%2E./b")
def test_normalisation_decodes_to_the_same_path(text: str) -> None:
    raw = text.encode("utf-8")
    result = normalise_path(raw)
    malformed = any(
        raw[i : i + 1] == b"%" and not all(c in b"0123456789abcdefABCDEF" for c in raw[i + 1 : i + 3].ljust(2, b"x"))
        for i in range(len(raw))
    )
    expected = None if malformed else _reference(raw)
    if expected is None:
        assert isinstance(result, Rejection) and result.status == 400
        return
    assert isinstance(result, bytes)
    assert unquote_to_bytes(result) == expected


@settings(max_examples=2000, deadline=None)
@given(st.one_of(PATHS.map(lambda t: t.encode("utf-8")), st.binary(max_size=40).map(lambda b: b"/" + b)))
def test_normalisation_is_idempotent_and_leaves_no_dot_or_empty_segment(raw: bytes) -> None:
    result = normalise_path(raw)
    if isinstance(result, Rejection):
        assert result.status == 400
        return
    assert normalise_path(result) == result
    assert normalise_target(result + b"?q=%2e") == result + b"?q=%2e"
    for shape in (b"//", b"/./", b"/../"):
        assert shape not in result
    assert not result.endswith((b"/.", b"/.."))
    assert result.startswith(b"/")
    assert all(0x21 <= byte <= 0x7E for byte in result)  # ASCII, printable: it goes out as it is
