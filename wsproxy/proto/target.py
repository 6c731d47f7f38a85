"""Request-target and Host normalisation before routing and auth. No I/O here.

The proxy decides who may pass by route, and a route is chosen by Host and
path; the backend then interprets the same request with its own parser, which
percent-decodes (ASGI and WSGI servers must), resolves dot segments and, for
many, merges slashes. Any spelling the proxy and the backend read differently
is an authorisation bypass (``/%61dmin``, ``//admin``, ``/x/../admin`` reach
``/admin`` while matching the open ``/`` route). So the target is brought to
one canonical form here, the router matches that form, and that form is what
goes upstream: the route that authorised a request is the route the backend
sees.

``normalise_target(raw)`` returns the normalised target (bytes) or a
``Rejection(400)`` with a fixed reason that never quotes the target.
For the path (RFC 3986 §6.2.2, in its order):

* percent-encoding (§6.2.2.2): escapes of unreserved characters
  (``ALPHA DIGIT - . _ ~``, §2.3) are decoded, every other escape keeps its
  octet with upper-case hex (§6.2.2.1); a byte that may not appear raw in a
  path (§3.3 ``pchar``: not unreserved, a sub-delim, ``:``, ``@`` or ``/``)
  is percent-encoded, so every decoded path has one spelling;
* refused with 400: an escape of ``/`` (``%2F``), ``\\`` (``%5C``) or NUL
  (``%00``), which decode into a different path structure on the backend
  than the proxy routed on; a raw ``\\`` (some servers read it as ``/``), NUL
  or control character; a ``%`` not followed by two hex digits; a ``#``
  (RFC 6455 §3: fragments MUST NOT be used; RFC 9112 §3.2.1 origin-form has
  none);
* dot segments (§6.2.2.3, the algorithm of §5.2.4) are resolved; a ``..``
  that would climb above the root is refused (400), not clamped to ``/``:
  no honest client sends one;
* repeated slashes are merged (``//a///b`` → ``/a/b``); a trailing slash is
  kept (``/a/`` and ``/a`` are different resources).

The query (after the first ``?``) is kept byte for byte: it is not part of
routing, and its encoding is the application's business (``a+b`` and
``a%20b`` differ to some). Path parameters (``;``) are kept as they are: they
are part of their segment, so ``/admin;x`` is not under the prefix
``/admin``; the router (``proto.routing``) refuses a request whose path would
pick a different route with its parameters removed, since servlet containers
strip them (``/admin;x`` and ``/public/..;/admin`` are ``/admin`` to Tomcat).
Only origin-form targets (``/path?query``) come here; ``check_upgrade``
refuses the other forms first.

``normalise_host(host)`` lower-cases a Host (already split from its port) and
strips one trailing dot (``secure.example.com.`` names the same host, RFC 1034
§3.1); anything but letters, digits, ``-``, ``.``, ``_``, ``~`` in a name, or
an empty label, makes it invalid (None). IPv6 literals are checked by the
caller.

The common case costs one regex match: a target whose path is already in
normal form (only unreserved characters, sub-delims, ``:`` and ``@``, no empty,
``.`` or ``..`` segment) is returned as the same object.
"""

from __future__ import annotations

import re

from .rejection import Rejection

__all__ = ["normalise_host", "normalise_path", "normalise_target", "without_path_parameters"]

#: RFC 3986 §2.3 unreserved characters: their escapes are decoded.
UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: §3.3 pchar without pct-encoded, plus "/": what a path may hold raw.
_PATH_RAW = UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
#: Escapes refused outright: "/" and "\" change the path's structure once decoded, NUL ends C strings.
_REFUSED_ESCAPES = {0x2F: "an encoded \"/\" (%2F)", 0x5C: "an encoded \"\\\" (%5C)", 0x00: "an encoded NUL (%00)"}

_SEGMENT_CHAR = rb"[A-Za-z0-9\-._~!$&'()*+,;=:@]"
_SEGMENT_START = rb"[A-Za-z0-9\-_~!$&'()*+,;=:@]"  # not ".": no dot segments, no hidden files (slow path)
#: A path already in normal form: non-empty segments of raw pchars that do not start with ".".
_NORMAL_PATH = re.compile(rb"(?:/" + _SEGMENT_START + _SEGMENT_CHAR + rb"*)*/?")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_HEX = b"0123456789ABCDEF"

_HOST_NAME = re.compile(r"[a-z0-9\-_~]+(?:\.[a-z0-9\-_~]+)*")


def _reject(what: str) -> Rejection:
    return Rejection(400, f"request path with {what}")


def normalise_target(target: bytes) -> bytes | Rejection:
    """The origin-form ``target`` in normal form (the same object when it already is), or 400.

    See the module docstring for every rule. The query is not touched.
    """
    path, question, query = target.partition(b"?")
    if _NORMAL_PATH.fullmatch(path) and b"#" not in query:
        return target
    if b"#" in target:
        return Rejection(400, "request target with a fragment (#)")
    normal = normalise_path(path)
    if isinstance(normal, Rejection):
        return normal
    if normal == path:
        return target
    return normal + question + query


def normalise_path(path: bytes) -> bytes | Rejection:
    """The path part of a target (starting with "/", no query) in normal form, or 400."""
    if _NORMAL_PATH.fullmatch(path):
        return path
    if not path.startswith(b"/"):
        return _reject("no leading \"/\"")
    out = bytearray()
    i, n = 0, len(path)
    while i < n:
        byte = path[i]
        if byte == 0x25:  # "%"
            escape = _ESCAPE.match(path, i)
            if escape is None:
                return _reject("a malformed percent-escape")
            octet = int(escape[1], 16)
            if octet in _REFUSED_ESCAPES:
                return _reject(_REFUSED_ESCAPES[octet])
            if octet in UNRESERVED:
                out.append(octet)
            else:
                out += b"%" + _HEX[octet >> 4 : (octet >> 4) + 1] + _HEX[octet & 15 : (octet & 15) + 1]
            i += 3
            continue
        if byte == 0x5C:
            return _reject("a backslash")
        if byte < 0x20 or byte == 0x7F:
            return _reject("a control character")
        if byte == 0x23:
            return Rejection(400, "request target with a fragment (#)")
        if byte in _PATH_RAW:
            out.append(byte)
        else:  # '"', "<", "[", "{", "|", obs-text...: one spelling, the escaped one
            out += b"%" + _HEX[byte >> 4 : (byte >> 4) + 1] + _HEX[byte & 15 : (byte & 15) + 1]
        i += 1
    return _resolve(bytes(out))


def _resolve(path: bytes) -> bytes | Rejection:
    """RFC 3986 §5.2.4 dot segments out and empty segments merged; ".." above the root is 400."""
    segments = path.split(b"/")[1:]  # the path starts with "/"
    kept: list[bytes] = []
    trailing = False
    for segment in segments:
        trailing = segment in (b"", b".", b"..")  # "/a/." and "/a/b/.." end in a directory
        if segment == b"..":
            if not kept:
                return _reject("a \"..\" segment above the root")
            kept.pop()
        elif segment and segment != b".":
            kept.append(segment)
    if not kept:
        return b"/"
    return b"/" + b"/".join(kept) + (b"/" if trailing else b"")


def without_path_parameters(path: str) -> str | None:
    """``path`` with every segment's ``;parameters`` removed and dot segments resolved again.

    This is how servlet containers read a path (``/admin;x`` → ``/admin``,
    ``/public/..;/admin`` → ``/admin``). None when a ".." would climb above
    the root that way.
    """
    stripped = "/".join(segment.partition(";")[0] for segment in path.split("/"))
    resolved = _resolve(stripped.encode("ascii", "surrogateescape"))
    if isinstance(resolved, Rejection):
        return None
    return resolved.decode("ascii", "surrogateescape")


def normalise_host(host: str) -> str | None:
    """A Host name (without its port) lower case and without one trailing dot; None when invalid."""
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    if not _HOST_NAME.fullmatch(host):
        return None
    return host
