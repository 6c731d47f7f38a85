"""JWT verification for the gate: key material and tokens. No I/O here.

``load_jwt_keys`` turns the bytes the config loader read (PEM public keys, a
JWKS, an HS secret) into ``JwtKeys``, refusing material that cannot serve the
listed algorithms; ``JwksSource`` holds the keys of a route with ``jwks_url``
(its static keys plus the last good document the fetcher, ``edge.jwks``,
handed it: parsing and choosing here, fetching there); ``verify_jwt`` checks a bearer token against them: only the
listed algorithms, never ``none``, each key only with its own family (so an
RSA public key can never verify an HS256 token), ``exp`` required, ``nbf``,
``iss`` and ``aud`` when configured, with ``leeway``. Part of ``proto.auth``'s
interface (re-exported there); see that module for how the gate uses it.
"""

from __future__ import annotations

import binascii
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import jwt as pyjwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.utils import base64url_decode

from wsproxy.config.schema import JWT_ALGORITHMS, AuthConfig, JwtConfig
from wsproxy.proto.auth import _TOKEN, Credential, Principal, _header_value, _invalid, _show, claim_header_name
from wsproxy.proto.handshake import Rejection


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


def _jwks_keys(data: bytes, listed: Sequence[str], name: str = "jwks_file") -> list[VerificationKey]:
    """RFC 7517 §5 JWK Set → keys. Entries meant for encryption (``use: enc``) are skipped."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError(f"{name}: not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f'{name}: expected a JSON object with a "keys" list')
    keys: list[VerificationKey] = []
    for i, entry in enumerate(document["keys"]):
        origin = f"{name}: keys[{i}]"
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


def load_jwt_keys(
    jwt: JwtConfig, *, pem_keys: Sequence[bytes], jwks: bytes | None, secret: bytes | None, allow_none: bool = False
) -> JwtKeys:
    """Build ``JwtConfig.key_material`` from the bytes of ``keys``, ``jwks_file`` and ``secret_file``.

    Raises ValueError with the precise reason: unknown or "none" algorithm, a
    PEM block that is not a public key, an unsupported key type, a JWKS that is
    not JSON or has a bad entry, a duplicate kid, a key whose family matches
    none of ``jwt.algorithms``, an empty or short secret, no key at all (unless
    ``allow_none``: a ``jwks_url`` brings them), or a ``pass_claims`` name that
    cannot become a header name.
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
    if not keys and not allow_none:
        raise ValueError("no keys: give keys, jwks_file or secret_file")

    by_kid: dict[str, VerificationKey] = {}
    for key in keys:
        if key.kid is not None:
            if key.kid in by_kid:
                raise ValueError(f"jwks_file: kid {key.kid!r} appears twice")
            by_kid[key.kid] = key
    return JwtKeys(keys=tuple(keys), by_kid=MappingProxyType(by_kid), jwks=jwks is not None)


# --- JWKS by URL --------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class JwksSource:
    """``JwtConfig.key_material`` of a route with ``jwks_url``: its static keys plus a fetched JWKS.

    Theory of operation: the loader builds it with the route's static keys
    (``keys``, ``jwks_file``, ``secret_file``; possibly none). The fetcher
    (``edge.jwks``) fetches the URL and calls ``install`` with the document;
    a document that does not parse changes nothing (the last good set stays),
    so ``keys`` only ever moves from one usable set to the next. A key of the
    document replaces a static key with the same ``kid`` (a ``jwks_file`` kept
    as a fallback copy of the same provider). ``keys`` is None only while no
    document was installed and there are no static keys. ``unknown_kid`` tells
    the gate that a token names a key the current set does not have, so the
    fetcher may fetch again (the provider rotated) before the token is judged.
    Mutated from the trio thread only; ``verify_jwt`` reads ``keys`` once.
    """

    url: str
    algorithms: tuple[str, ...]
    static: JwtKeys | None  # from keys, jwks_file and secret_file; None when there are none
    refresh_s: float
    min_refresh_s: float
    ca: str | None = None
    keys: JwtKeys | None = None
    document: bytes | None = None  # the installed document (the fetcher hands the same one to a reload's sources)
    installed_at: float | None = None  # fetch time of the installed document

    def __post_init__(self) -> None:
        if self.keys is None and self.static is not None and self.static.keys:
            self.keys = self.static

    def install(self, document: bytes, fetched_at: float) -> int:
        """Use ``document`` from now on; the number of its keys. ValueError (nothing changes) when unusable."""
        remote = _jwks_keys(document, self.algorithms, name="jwks_url")
        by_kid: dict[str, VerificationKey] = {}
        for key in remote:
            if key.kid is not None:
                if key.kid in by_kid:
                    raise ValueError(f"jwks_url: kid {key.kid!r} appears twice")
                by_kid[key.kid] = key
        static = [k for k in (self.static.keys if self.static else ()) if k.kid is None or k.kid not in by_kid]
        for key in static:
            if key.kid is not None:
                by_kid[key.kid] = key
        self.keys = JwtKeys(keys=(*static, *remote), by_kid=MappingProxyType(by_kid), jwks=True)
        self.document = document
        self.installed_at = fetched_at
        return len(remote)

    def unknown_kid(self, token: str) -> str | None:
        """The ``kid`` of ``token``'s header when the current keys lack it (a fetch may find it), else None."""
        header = _b64url_json(token.split(".", 1)[0]) if token.count(".") == 2 else None
        kid = header.get("kid") if isinstance(header, dict) else None
        if not isinstance(kid, str):
            return None
        if self.keys is not None and kid in self.keys.by_kid:
            return None
        return kid


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
    if isinstance(material, JwksSource):
        if material.keys is None:  # a reload added the URL and no fetch has succeeded yet
            return Rejection(503, f"jwt keys of {material.url} not fetched yet")
        material = material.keys
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
