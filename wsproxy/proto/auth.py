"""Authentication at the gate: find a bearer credential, verify it, name the principal.

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

import binascii
import hashlib
import hmac
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote_to_bytes

import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.utils import base64url_decode

from wsproxy.config.schema import JWT_ALGORITHMS, AuthConfig, JwtConfig, TokenConfig
from wsproxy.proto.handshake import Rejection, Upgrade

__all__ = [
    "Credential",
    "JwtKeys",
    "Principal",
    "Rewrite",
    "VerificationKey",
    "claim_header_name",
    "find_credential",
    "identity_headers",
    "load_jwt_keys",
    "missing_credentials",
    "parse_tokens_file",
    "verify_jwt",
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

    target = upgrade.request.target
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


# --- JWT keys --------------------------------------------------------------------------------


#: RFC 7518 §3.2: an HMAC key at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
#: RFC 7518 §3.4: each ES* algorithm names its curve.
_EC_CURVE_ALGORITHM = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_RSA_MIN_BITS = 2048  # NIST SP 800-131A; pyjwt warns below this too


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key (or HMAC secret) and the listed algorithms it may verify."""

    origin: str  # "keys[0] (FILE)", "jwks[1] (kid 'a')", "secret_file": for messages
    kid: str | None  # from the JWKS; PEM keys and the secret have none
    algorithms: frozenset[str]  # never empty; all of one family
    key: Any = field(repr=False)  # cryptography public key, or bytes for HS*


@dataclass(frozen=True, slots=True)
class JwtKeys:
    """``JwtConfig.key_material``: what ``verify_jwt`` verifies with."""

    keys: tuple[VerificationKey, ...]
    by_kid: Mapping[str, VerificationKey]  # JWKS keys with a kid
    jwks: bool  # a JWKS was given: a token's kid must then name one of its keys


def _algorithms_for(key: object, listed: Sequence[str], origin: str) -> frozenset[str]:
    """The listed algorithms of ``key``'s family (RFC 7518 §3.1): a key never serves another family."""
    if isinstance(key, bytes):
        try:  # pyjwt refuses PEM and SSH public keys as HMAC secrets (the RS/HS confusion)
            HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)
        except pyjwt.PyJWTError:
            raise ValueError(f"{origin}: looks like a public key, not an HMAC secret") from None
        family, candidates = "an HMAC secret", {a for a in listed if a.startswith("HS")}
        usable = {a for a in candidates if len(key) >= _HMAC_MIN_BYTES[a]}
        if candidates and not usable:
            need = min(_HMAC_MIN_BYTES[a] for a in candidates)
            raise ValueError(f"{origin}: the secret is {len(key)} bytes; RFC 7518 §3.2 needs at least {need}")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _RSA_MIN_BITS:
            raise ValueError(f"{origin}: the RSA key has {key.key_size} bits; at least {_RSA_MIN_BITS} are needed")
        family, usable = "an RSA key (RS*, PS*)", {a for a in listed if a[:2] in ("RS", "PS")}
    elif isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = _EC_CURVE_ALGORITHM.get(key.curve.name)
        if algorithm is None:
            raise ValueError(f"{origin}: unsupported EC curve {key.curve.name}")
        family, usable = f"an EC {key.curve.name} key ({algorithm})", {a for a in listed if a == algorithm}
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        family, usable = "an EdDSA key", {a for a in listed if a == "EdDSA"}
    else:
        raise ValueError(f"{origin}: unsupported key type {type(key).__name__}")
    if not usable:
        raise ValueError(f"{origin}: {family}, but algorithms lists none it can verify: {', '.join(listed)}")
    return frozenset(usable)


def _pem_key(data: bytes, origin: str) -> object:
    if b"PRIVATE KEY-----" in data:
        raise ValueError(f"{origin}: a private key; give the public key only")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except ValueError:
        raise ValueError(f"{origin}: not a PEM public key or certificate") from None
    except Exception as exc:  # cryptography's UnsupportedAlgorithm and friends
        raise ValueError(f"{origin}: unsupported key: {exc}") from None


_JWK_LOADERS: dict[str, Callable[[dict[str, Any]], object]] = {
    "RSA": RSAAlgorithm.from_jwk,
    "EC": ECAlgorithm.from_jwk,
    "OKP": OKPAlgorithm.from_jwk,
    "oct": HMACAlgorithm.from_jwk,
}


def _jwks_keys(data: bytes, listed: Sequence[str]) -> list[VerificationKey]:
    """RFC 7517 §5 JWK Set → keys. Entries meant for encryption (``use: enc``) are skipped."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("jwks_file: not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('jwks_file: expected a JSON object with a "keys" list')
    keys: list[VerificationKey] = []
    for i, entry in enumerate(document["keys"]):
        origin = f"jwks_file: keys[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{origin}: not a JSON object")
        kid = entry.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"{origin}: kid is not a string")
        if kid is not None:
            origin += f" (kid {kid!r})"
        kty = entry.get("kty")
        if kty != "oct" and "d" in entry:  # RFC 7518 §6.2.2.1, §6.3.2.1, RFC 8037 §2
            raise ValueError(f"{origin}: a private key; give the public key only")
        # RFC 7517 §4.2, §4.3: a key for encryption, or not for verifying, is not ours to use.
        ops = entry.get("key_ops")
        if entry.get("use", "sig") != "sig" or (isinstance(ops, list) and "verify" not in ops):
            continue
        loader = _JWK_LOADERS.get(kty) if isinstance(kty, str) else None
        if loader is None:
            raise ValueError(f"{origin}: unsupported kty {_show(kty)}")
        try:
            key = loader(entry)
        except (pyjwt.PyJWTError, ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise ValueError(f"{origin}: invalid {kty} key: {exc}") from None
        algorithms = _algorithms_for(key, listed, origin)
        alg = entry.get("alg")  # RFC 7517 §4.4: the key is for this algorithm only
        if alg is not None:
            if not isinstance(alg, str) or alg not in algorithms:
                raise ValueError(f"{origin}: alg {_show(alg)} is not a listed algorithm this key can verify")
            algorithms = frozenset({alg})
        keys.append(VerificationKey(origin=origin, kid=kid, algorithms=algorithms, key=key))
    return keys


def load_jwt_keys(jwt: JwtConfig, *, pem_keys: Sequence[bytes], jwks: bytes | None, secret: bytes | None) -> JwtKeys:
    """Build ``JwtConfig.key_material`` from the bytes of ``keys``, ``jwks_file`` and ``secret_file``.

    Raises ValueError with the precise reason: unknown or "none" algorithm, a
    PEM block that is not a public key, an unsupported key type, a JWKS that is
    not JSON or has a bad entry, a duplicate kid, a key whose family matches
    none of ``jwt.algorithms``, an empty or short secret, no key at all, or a
    ``pass_claims`` name that cannot become a header name.
    """
    listed = list(jwt.algorithms)
    for alg in listed:
        if alg not in JWT_ALGORITHMS:
            raise ValueError(f"algorithms: {alg!r} is not supported (choose from {', '.join(JWT_ALGORITHMS)})")
    if not listed:
        raise ValueError("algorithms: list at least one")
    headers: dict[str, str] = {}
    for claim in jwt.pass_claims:
        header = claim_header_name(claim)
        if not _TOKEN.fullmatch(header) or not all(re.split(r"[-_]", claim)):
            raise ValueError(f"pass_claims: {claim!r} cannot be part of a header name")
        if header.lower() in headers:
            raise ValueError(f"pass_claims: {claim!r} and {headers[header.lower()]!r} are both sent as {header}")
        headers[header.lower()] = claim

    keys: list[VerificationKey] = []
    for i, data in enumerate(pem_keys):
        origin = f"keys[{i}]" + (f" ({jwt.keys[i]})" if i < len(jwt.keys) else "")
        key = _pem_key(data, origin)
        keys.append(VerificationKey(origin=origin, kid=None, algorithms=_algorithms_for(key, listed, origin), key=key))
    if jwks is not None:
        keys += _jwks_keys(jwks, listed)
    if secret is not None:
        secret = secret.rstrip(b"\r\n")  # the newline an editor or `echo` leaves is not part of the secret
        if not secret:
            raise ValueError("secret_file: empty")
        keys.append(VerificationKey("secret_file", None, _algorithms_for(secret, listed, "secret_file"), secret))
    if not keys:
        raise ValueError("no keys: give keys, jwks_file or secret_file")

    by_kid: dict[str, VerificationKey] = {}
    for key in keys:
        if key.kid is not None:
            if key.kid in by_kid:
                raise ValueError(f"jwks_file: kid {key.kid!r} appears twice")
            by_kid[key.kid] = key
    return JwtKeys(keys=tuple(keys), by_kid=MappingProxyType(by_kid), jwks=jwks is not None)


# --- JWT verification -------------------------------------------------------------------------


def _b64url_json(segment: str) -> object:
    """RFC 7515 §2 base64url without padding, then JSON; None when either fails."""
    try:
        raw = base64url_decode(segment.encode("ascii"))
        return json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError, binascii.Error, UnicodeError):
        return None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # json.loads accepts NaN and Infinity otherwise


def _number(value: object) -> bool:
    """A JSON NumericDate (RFC 7519 §2): finite, and not a bool or an int too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


_SIGNATURES = pyjwt.PyJWS(options={"enforce_minimum_key_length": True})


def verify_jwt(auth: AuthConfig, credential: Credential, now: float) -> Principal | Rejection:
    """RFC 7519 §7.2 validation of a JWS-signed JWT, at time ``now`` (Unix seconds).

    The header's ``alg`` must be listed (``none`` never is); the key comes from
    the token's ``kid`` when a JWKS was given, else every key of that
    algorithm's family is tried. Then ``exp`` (required), ``nbf``, ``iss`` and
    ``aud`` are checked with ``leeway_s``. A token with ``aud`` is refused when
    the route names no audience (RFC 7519 §4.1.3).
    """
    config = auth.jwt
    material = config.key_material if config is not None else None
    if config is None or not isinstance(material, JwtKeys):
        return Rejection(500, "jwt auth without loaded keys (load_jwt_keys was not called)")
    token = credential.value

    # RFC 7515 §5.2 steps 1-4, done here for precise reasons; pyjwt repeats them.
    parts = token.split(".")
    if len(parts) != 3:
        return _invalid(f"jwt malformed: {len(parts)} dot-separated parts, not 3")
    header = _b64url_json(parts[0])
    if not isinstance(header, dict):
        return _invalid("jwt malformed: the header is not base64url JSON object")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in config.algorithms or alg.lower() == "none":
        shown = alg if alg in (*JWT_ALGORITHMS, "none") else _show(alg)
        return _invalid(f"alg {shown} not allowed")
    if "crit" in header:  # RFC 7515 §4.1.11: we understand no extensions
        return _invalid(f"jwt header has crit {_show(header['crit'])}: no extension is supported")

    kid = header.get("kid")
    if material.jwks and kid is not None:
        chosen = material.by_kid.get(kid) if isinstance(kid, str) else None
        if chosen is None:
            return _invalid(f"kid {_show(kid)} not in jwks")
        if alg not in chosen.algorithms:
            return _invalid(f"kid {_show(kid)} cannot verify alg {alg}")
        candidates = [chosen]
    else:
        candidates = [k for k in material.keys if alg in k.algorithms]
        if not candidates:
            return _invalid(f"no key for alg {alg}")

    payload_bytes: bytes | None = None
    for candidate in candidates:
        try:
            decoded = _SIGNATURES.decode_complete(token, key=candidate.key, algorithms=[alg])
        except pyjwt.InvalidSignatureError:
            continue
        except pyjwt.DecodeError:
            return _invalid("jwt malformed: payload or signature is not base64url")
        except pyjwt.PyJWTError as exc:  # pyjwt's own header checks; its messages hold no token bytes
            return _invalid(f"jwt refused by pyjwt: {type(exc).__name__}: {exc}")
        payload_bytes = decoded["payload"]
        break
    if payload_bytes is None:
        return _invalid("jwt signature invalid")
    try:
        claims = json.loads(payload_bytes, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # also NaN and Infinity (RFC 8259 §6)
        return _invalid("jwt payload is not JSON")
    if not isinstance(claims, dict):
        return _invalid("jwt payload is not a JSON object")
    problem = _check_claims(config, claims, now)
    if problem is not None:
        return _invalid(problem)
    return Principal(identity=_identity_text(claims[config.identity_claim]), claims=MappingProxyType(claims))


def _check_claims(config: JwtConfig, claims: dict[str, Any], now: float) -> str | None:
    """RFC 7519 §4.1 registered claims; the reason a check failed, or None."""
    leeway = config.leeway_s
    exp = claims.get("exp")
    if exp is None:
        return "jwt has no exp claim"
    if not _number(exp):
        return f"jwt exp is not a number: {_show(exp)}"
    if now >= exp + leeway:  # §4.1.4: MUST NOT be accepted on or after exp
        return f"jwt expired {now - exp:.0f}s ago"
    for name in ("nbf", "iat"):
        if name in claims and not _number(claims[name]):
            return f"jwt {name} is not a number: {_show(claims[name])}"
    nbf = claims.get("nbf")
    if nbf is not None and now + leeway < nbf:  # §4.1.5: MUST NOT be accepted before nbf
        return f"jwt not valid yet: nbf is {nbf - now:.0f}s ahead"
    if config.issuer is not None:
        if "iss" not in claims:
            return "jwt has no iss claim"
        if claims["iss"] != config.issuer:
            return f"jwt issuer mismatch: got {_show(claims['iss'])}"
    if "aud" in claims:  # §4.1.3: a string or an array of strings
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            return f"jwt aud is not a string or list of strings: {_show(aud)}"
        if config.audience is None:
            return f"jwt has aud {_show(aud)} but the route names no audience"
        if config.audience not in audiences:
            return f"jwt audience mismatch: got {_show(aud)}"
    elif config.audience is not None:
        return "jwt has no aud claim"
    name = config.identity_claim
    if name not in claims:
        return f"jwt has no {name!r} claim"
    identity = claims[name]
    if isinstance(identity, bool) or not isinstance(identity, (str, int)):
        return f"jwt claim {name!r} is not a string or integer: {_show(identity)}"
    if _header_value(_identity_text(identity)) is None:
        return f"jwt claim {name!r} is not usable as a header value: {_show(identity)}"
    return None


def _identity_text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


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
