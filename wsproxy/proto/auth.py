"""Authentication at the gate: find a bearer credential, verify it, name the principal.

The JWT half (keys and token verification) is in ``proto.jwt``.

Plain functions over an ``Upgrade`` and the route's ``AuthConfig``. No I/O here:
no trio, no sockets, no clock (``now`` is passed in), no files (the config
loader reads the files and hands their bytes to ``load_jwt_keys`` and
``parse_tokens_file``). Forward auth, which needs a network call, is not here.

The gate's use of it::

    credential, rewrite = find_credential(auth, upgrade)   # where it was, and the upstream request without it
    if credential is None:          → missing_credentials()                 401, WWW-Authenticate: Bearer
    verify_tokens(auth, credential) or verify_jwt(auth, credential, now)
                                    → Principal | Rejection                 401, Bearer error="invalid_token"
    identity_headers(auth, principal)   → appended to ``rewrite.headers``

Every verdict carries its reaction. A ``Rejection.reason`` says precisely which
check failed, for the log; the response body never does (``http_error``).
Nothing this module returns for logging (reasons, reprs) contains the
credential or anything computed from it: not a prefix, not a hash, not a length.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import unquote_to_bytes


from wsproxy.config.schema import AuthConfig, TokenConfig
from wsproxy.proto.handshake import Rejection, Upgrade

__all__ = [
    "Credential",
    "Principal",
    "Rewrite",
    "claim_header_name",
    "find_credential",
    "identity_headers",
    "missing_credentials",
    "parse_tokens_file",
    "verify_tokens",
]

CLAIM_HEADER_PREFIX = "X-Auth-Claim-"

#: RFC 7230 §3.2.6 token: what a header name may be made of.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


# --- verdicts and the things they carry ----------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class Credential:
    """A bearer credential and where it was found (``header``, ``cookie:NAME``, ``query:NAME``, ``subprotocol``)."""

    value: str
    source: str

    def __repr__(self) -> str:
        return f"Credential(source={self.source!r}, value=<redacted>)"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who the credential speaks for: the identity and, for a JWT, all of its claims."""

    identity: str
    claims: Mapping[str, object]


@dataclass(frozen=True, slots=True, repr=False)
class Rewrite:
    """How the upstream request differs from the client's.

    ``headers`` are the client's headers (raw names, in order) minus every
    credential found in a configured source and minus client-sent copies of the
    identity and X-Auth-Claim-* headers. ``subprotocol_reply`` is what the
    proxy's 101 names in Sec-WebSocket-Protocol when the backend picks nothing:
    set when credential entries left the client's offer empty, because browsers
    fail a 101 that names no protocol after they offered some (RFC 6455 §4.1,
    and the WHATWG WebSocket "establish a connection" steps).
    """

    target: bytes
    headers: list[tuple[bytes, bytes]]
    subprotocol_reply: str | None

    def __repr__(self) -> str:
        # The access_token.<token> reply holds the credential; the rest never does.
        reply = self.subprotocol_reply
        shown = "'access_token.<redacted>'" if reply and reply.startswith("access_token.") else repr(reply)
        return f"Rewrite(target={self.target!r}, headers={self.headers!r}, subprotocol_reply={shown})"


def missing_credentials() -> Rejection:
    """RFC 6750 §3.1: a request without credentials gets a bare challenge, no error code."""
    return Rejection(401, "missing credentials", ((b"WWW-Authenticate", b"Bearer"),))


def _invalid(reason: str) -> Rejection:
    """RFC 6750 §3.1 invalid_token; which check failed stays in ``reason``."""
    return Rejection(401, reason, ((b"WWW-Authenticate", b'Bearer error="invalid_token"'),))


def _show(value: object, limit: int = 60) -> str:
    """A claim or header parameter for a log line: repr, cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- where credentials are --------------------------------------------------------------------


def _parse_sources(sources: Iterable[str]) -> list[tuple[str, str]]:
    parsed = []
    for source in sources:
        kind, _, name = source.partition(":")
        if (kind in ("header", "subprotocol") and not name) or (kind in ("cookie", "query") and name):
            parsed.append((kind, name))
        else:
            raise ValueError(f"unknown auth source: {source!r}")
    return parsed


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _bearer(value: bytes) -> bytes | None:
    """RFC 6750 §2.1 ``Bearer <b64token>`` (scheme case-insensitive, RFC 7235 §2.1), or None."""
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


def _subprotocol_credentials(entries: list[bytes]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """The ``bearer, <token>`` pairs and ``access_token.<token>`` entries of an offer.

    Returns ``[(token, reply), ...]`` in offer order, where ``reply`` is what the
    101 names for that form, and the entries that remain.
    """
    found, kept = [], []
    i = 0
    while i < len(entries):
        entry = entries[i]
        if entry.lower() == b"bearer" and i + 1 < len(entries):
            found.append((entries[i + 1], entry))
            i += 2
            continue
        if entry.startswith(b"access_token.") and len(entry) > len(b"access_token."):
            found.append((entry[len(b"access_token.") :], entry))
        else:
            kept.append(entry)
        i += 1
    return found, kept


def find_credential(auth: AuthConfig, upgrade: Upgrade) -> tuple[Credential | None, Rewrite]:
    """The first credential in ``auth.sources`` order, and the request to send upstream.

    Every configured source is emptied upstream, not only the one used, so a
    second credential never reaches the backend (or its logs). A source counts
    as having a credential when it holds a non-empty one: ``Authorization:
    Bearer`` with nothing after it is removed but is not a credential.
    """
    sources = _parse_sources(auth.sources)
    cookie_names = {name.encode(): f"cookie:{name}" for kind, name in sources if kind == "cookie"}
    query_names = {name.encode(): f"query:{name}" for kind, name in sources if kind == "query"}
    want_header = ("header", "") in sources
    want_subprotocol = ("subprotocol", "") in sources
    spoofed = {auth.identity_header.lower().replace("_", "-").encode()}

    found: dict[str, bytes] = {}  # source → the first credential seen there
    headers: list[tuple[bytes, bytes]] = []
    offer: list[bytes] = []
    offer_at: list[int] = []  # where the Sec-WebSocket-Protocol headers are in ``headers``
    for raw_name, value in upgrade.request.headers.raw_items():
        name = raw_name.lower()
        canonical = name.replace(b"_", b"-")  # CGI-style backends read X_Auth_Subject as X-Auth-Subject
        if canonical in spoofed or canonical.startswith(b"x-auth-claim-"):
            continue
        if name == b"authorization" and want_header:
            token = _bearer(value)
            if token is not None:
                if token:
                    found.setdefault("header", token)
                continue
        if name == b"cookie" and cookie_names:
            pairs = [pair.strip() for pair in value.split(b";") if pair.strip()]
            kept = []
            for pair in pairs:
                cookie_name, eq, cookie = pair.partition(b"=")
                cookie_name = cookie_name.strip()
                if not (eq and cookie_name in cookie_names):
                    kept.append(pair)
                    continue
                cookie = cookie.strip()
                if len(cookie) >= 2 and cookie[:1] == cookie[-1:] == b'"':  # RFC 6265 §4.1.1: may be quoted
                    cookie = cookie[1:-1]
                if cookie:
                    found.setdefault(cookie_names[cookie_name], cookie)
            if len(kept) < len(pairs):
                if kept:
                    headers.append((raw_name, b"; ".join(kept)))  # RFC 6265 §5.4 separator
                continue
        if name == b"sec-websocket-protocol" and want_subprotocol:
            offer_at.append(len(headers))
            offer += [entry.strip() for entry in value.split(b",") if entry.strip()]  # RFC 6455 §4.1, 1#token
        headers.append((raw_name, value))

    reply: str | None = None
    credentials, remaining = _subprotocol_credentials(offer)
    if credentials:  # the offer goes upstream as one header, where the first one was
        found["subprotocol"] = credentials[0][0]
        first = offer_at[0]
        if remaining:
            headers[first] = (headers[first][0], b", ".join(remaining))
        else:
            reply = credentials[0][1].decode("latin-1")
        for index in reversed(offer_at if not remaining else offer_at[1:]):
            del headers[index]

    target = upgrade.target  # normalised (proto.target); its query is the client's
    if query_names and b"?" in target:
        path, _, query = target.partition(b"?")
        kept_params = []
        for param in query.split(b"&"):
            key, _, raw_value = param.partition(b"=")
            decoded = unquote_to_bytes(key)
            if decoded in query_names:
                if raw_value:
                    found.setdefault(query_names[decoded], unquote_to_bytes(raw_value))
            else:
                kept_params.append(param)
        target = path + b"?" + b"&".join(kept_params) if kept_params else path

    rewrite = Rewrite(target=target, headers=headers, subprotocol_reply=reply)
    for kind, source_name in sources:
        source = f"{kind}:{source_name}" if source_name else kind
        if source in found:
            return Credential(value=_text(found[source]), source=source), rewrite
    return None, rewrite


# --- static tokens ------------------------------------------------------------------------------


def parse_tokens_file(text: str) -> list[TokenConfig]:
    """A ``tokens_file``: one ``NAME SHA256HEX`` a line; blank lines and ``#`` comments are skipped.

    Errors name the line but never echo the digest field, in case someone pasted
    a token there.
    """
    tokens = []
    seen: dict[bytes, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"line {number}: expected \"NAME SHA256HEX\", got {len(fields)} fields")
        name, digest = fields
        if not name.isprintable():
            raise ValueError(f"line {number}: the name contains control characters")
        if not _HEX_DIGEST.fullmatch(digest):
            raise ValueError(f"line {number}: the digest of {name!r} is not 64 hex digits (SHA-256)")
        sha256 = bytes.fromhex(digest)
        if sha256 in seen:
            raise ValueError(f"line {number}: the digest of {name!r} repeats line {seen[sha256]}")
        seen[sha256] = number
        tokens.append(TokenConfig(name=name, sha256=sha256))
    return tokens


def verify_tokens(auth: AuthConfig, credential: Credential) -> Principal | Rejection:
    """Is the credential one of ``auth.tokens``? Compared as SHA-256 digests.

    Every entry is compared with ``hmac.compare_digest``, with no early exit, so
    the time taken does not say which entry (or how much of one) matched.
    """
    digest = hashlib.sha256(credential.value.encode("utf-8")).digest()
    identity: str | None = None
    for token in auth.tokens:
        if hmac.compare_digest(digest, token.sha256) and identity is None:
            identity = token.name
    if identity is None:
        return _invalid("unknown token")
    return Principal(identity=identity, claims=MappingProxyType({}))


# --- identity towards the backend ---------------------------------------------------------------


def claim_header_name(claim: str) -> str:
    """``tenant`` → ``X-Auth-Claim-Tenant``, ``org_id`` → ``X-Auth-Claim-Org-Id``."""
    return CLAIM_HEADER_PREFIX + "-".join(part.capitalize() for part in re.split(r"[-_]", claim))


def _header_value(text: str) -> bytes | None:
    """``text`` as a field value (RFC 7230 §3.2), or None if it would not survive as one.

    Control characters could split the header (CR LF), and surrounding
    whitespace is dropped by the backend's parser, so " alice" would arrive as
    "alice": both are refused rather than rewritten.
    """
    if not text or text != text.strip(" \t") or any(c < " " and c != "\t" or c == "\x7f" for c in text):
        return None
    return text.encode("utf-8")


def _claim_text(value: object) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"  # as JSON spells them
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, list):
        items = [None if isinstance(item, list) else _claim_text(item) for item in value]
        if any(item is None for item in items):
            return None  # a list with a non-scalar item is skipped whole, not passed in part
        return ",".join(item for item in items if item is not None)
    return None


def identity_headers(auth: AuthConfig, principal: Principal) -> list[tuple[bytes, bytes]]:
    """``identity_header`` with the identity, then ``X-Auth-Claim-<Name>`` for each present pass_claim.

    Claim values: strings, numbers and booleans as text, lists of those joined
    by ","; a claim of another type, or whose text is not a clean header value,
    is skipped.
    """
    identity = _header_value(principal.identity)
    headers = [(auth.identity_header.encode("ascii"), identity)] if identity is not None else []
    for claim in auth.jwt.pass_claims if auth.jwt is not None else ():
        if claim not in principal.claims:
            continue
        text = _claim_text(principal.claims[claim])
        name = claim_header_name(claim)
        value = _header_value(text) if text else (b"" if text == "" else None)
        if value is not None and _TOKEN.fullmatch(name):
            headers.append((name.encode("ascii"), value))
    return headers

