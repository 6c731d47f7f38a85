"""Authentication at the gate: credential sources, static tokens, JWTs, identity headers.

Requests are written by an h11 client, read back by an h11 server and checked
by ``check_upgrade``, as the proxy's listener does. Keys are generated here
with ``cryptography`` and tokens signed with ``jwt.encode`` (or by hand, for
the tokens pyjwt refuses to make). No sockets, no event loop, no clock: ``now``
is a constant.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from typing import Any

import h11
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa, x25519
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from wsproxy.config.schema import AuthConfig, JwtConfig, TokenConfig
from wsproxy.proto.auth import (
    Credential,
    Principal,
    Rewrite,
    claim_header_name,
    find_credential,
    identity_headers,
    missing_credentials,
    parse_tokens_file,
    verify_tokens,
)
from wsproxy.proto.jwt import JwtKeys, load_jwt_keys, verify_jwt
from wsproxy.proto.handshake import Rejection, Upgrade, check_upgrade

Headers = list[tuple[bytes, bytes]]

NOW = 1_700_000_000.0
TOKEN = "tok-3fa2c9e1b7d04a5f8e6c2b1a9d7f3e5c"  # a static bearer token; never in a log line
SECRET = b"0123456789abcdef0123456789abcdef-hs256-shared-secret"

BASE: Headers = [
    (b"Host", b"chat.example.com"),
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Sec-WebSocket-Version", b"13"),
]

INVALID_TOKEN = ((b"WWW-Authenticate", b'Bearer error="invalid_token"'),)


def upgrade(extra: Sequence[tuple[bytes, bytes]] = (), target: bytes = b"/ws") -> Upgrade:
    """An upgrade as the listener sees it: h11 client → bytes → h11 server → check_upgrade."""
    client = h11.Connection(h11.CLIENT)
    data = client.send(h11.Request(method=b"GET", target=target, headers=[*BASE, *extra]))
    server = h11.Connection(h11.SERVER)
    server.receive_data(data)
    request = server.next_event()
    assert isinstance(request, h11.Request)
    checked = check_upgrade(request)
    assert isinstance(checked, Upgrade), checked
    return checked


def auth(*sources: str, mode: str = "tokens", **kwargs: Any) -> AuthConfig:
    return AuthConfig(mode=mode, sources=sources or ("header",), **kwargs)


def extra_headers(rewrite: Rewrite) -> Headers:
    """The rewritten headers minus the fixed handshake ones."""
    return [h for h in rewrite.headers if h not in BASE]


def assert_no_leak(secret: str, *things: object) -> None:
    for thing in things:
        assert secret not in repr(thing)
        assert secret not in str(thing)


# --- credential sources ------------------------------------------------------------------


def test_header_bearer_is_found_and_removed() -> None:
    up = upgrade([(b"Authorization", b"Bearer " + TOKEN.encode()), (b"X-Trace", b"1")])
    credential, rewrite = find_credential(auth("header"), up)
    assert credential == Credential(value=TOKEN, source="header")
    assert rewrite.headers == [*BASE, (b"X-Trace", b"1")]  # raw names, order kept
    assert rewrite.target == b"/ws"
    assert rewrite.subprotocol_reply is None


@pytest.mark.parametrize("value", [b"bearer ", b"BEARER ", b"bEaReR   "])
def test_header_scheme_is_case_insensitive(value: bytes) -> None:
    credential, rewrite = find_credential(auth("header"), upgrade([(b"authorization", value + b"abc")]))
    assert credential == Credential(value="abc", source="header")
    assert extra_headers(rewrite) == []


def test_header_other_schemes_are_not_credentials_and_pass() -> None:
    headers = [(b"Authorization", b"Basic dXNlcjpwYXNz")]
    credential, rewrite = find_credential(auth("header"), upgrade(headers))
    assert credential is None
    assert extra_headers(rewrite) == headers


def test_header_bearer_without_token_is_missing_but_removed() -> None:
    credential, rewrite = find_credential(auth("header"), upgrade([(b"Authorization", b"Bearer")]))
    assert credential is None
    assert extra_headers(rewrite) == []


def test_cookie_is_found_and_other_cookies_kept() -> None:
    headers = [(b"Cookie", b"theme=dark; session=" + TOKEN.encode() + b"; lang=en")]
    credential, rewrite = find_credential(auth("cookie:session"), upgrade(headers))
    assert credential == Credential(value=TOKEN, source="cookie:session")
    assert extra_headers(rewrite) == [(b"Cookie", b"theme=dark; lang=en")]


def test_cookie_alone_drops_the_header_and_quotes_are_removed() -> None:
    credential, rewrite = find_credential(auth("cookie:session"), upgrade([(b"Cookie", b'session="abc"')]))
    assert credential == Credential(value="abc", source="cookie:session")
    assert extra_headers(rewrite) == []


def test_cookie_names_are_exact() -> None:
    headers = [(b"Cookie", b"Session=x; session_id=y; xsession=z")]
    credential, rewrite = find_credential(auth("cookie:session"), upgrade(headers))
    assert credential is None
    assert extra_headers(rewrite) == headers


def test_query_is_percent_decoded_and_other_params_kept_byte_for_byte() -> None:
    target = b"/ws?room=a%20b&access_token=ab%2Bc%2F%3D+x&x=1&&flag"
    credential, rewrite = find_credential(auth("query:access_token"), upgrade(target=target))
    assert credential == Credential(value="ab+c/=+x", source="query:access_token")  # "+" is not a space
    assert rewrite.target == b"/ws?room=a%20b&x=1&&flag"


@pytest.mark.parametrize(
    ("target", "upstream"),
    [
        (b"/ws?access_token=abc", b"/ws"),
        (b"/ws?access%5Ftoken=abc&n=1", b"/ws?n=1"),  # the name is percent-decoded too
        (b"/ws?access_token=abc&access_token=def", b"/ws"),  # every copy goes
    ],
)
def test_query_parameter_removed(target: bytes, upstream: bytes) -> None:
    credential, rewrite = find_credential(auth("query:access_token"), upgrade(target=target))
    assert credential == Credential(value="abc", source="query:access_token")
    assert rewrite.target == upstream


def test_query_without_the_parameter_is_untouched() -> None:
    credential, rewrite = find_credential(auth("query:access_token"), upgrade(target=b"/ws?token=1&x="))
    assert credential is None
    assert rewrite.target == b"/ws?token=1&x="


def test_subprotocol_bearer_form_with_a_remaining_offer() -> None:
    headers = [(b"Sec-WebSocket-Protocol", b"chat.v2, bearer, " + TOKEN.encode() + b", chat.v1")]
    credential, rewrite = find_credential(auth("subprotocol"), upgrade(headers))
    assert credential == Credential(value=TOKEN, source="subprotocol")
    assert extra_headers(rewrite) == [(b"Sec-WebSocket-Protocol", b"chat.v2, chat.v1")]
    assert rewrite.subprotocol_reply is None  # the backend chooses among what is left


def test_subprotocol_bearer_form_alone_answers_bearer() -> None:
    headers = [(b"Sec-WebSocket-Protocol", b"bearer, " + TOKEN.encode())]
    credential, rewrite = find_credential(auth("subprotocol"), upgrade(headers))
    assert credential == Credential(value=TOKEN, source="subprotocol")
    assert extra_headers(rewrite) == []
    assert rewrite.subprotocol_reply == "bearer"


def test_subprotocol_offer_split_over_headers() -> None:
    headers = [
        (b"Sec-WebSocket-Protocol", b"chat, bearer"),
        (b"X-Between", b"1"),
        (b"sec-websocket-protocol", TOKEN.encode()),
    ]
    credential, rewrite = find_credential(auth("subprotocol"), upgrade(headers))
    assert credential == Credential(value=TOKEN, source="subprotocol")
    assert extra_headers(rewrite) == [(b"Sec-WebSocket-Protocol", b"chat"), (b"X-Between", b"1")]


def test_subprotocol_access_token_form_alone_answers_that_entry() -> None:
    entry = b"access_token." + TOKEN.encode()
    credential, rewrite = find_credential(auth("subprotocol"), upgrade([(b"Sec-WebSocket-Protocol", entry)]))
    assert credential == Credential(value=TOKEN, source="subprotocol")
    assert extra_headers(rewrite) == []
    assert rewrite.subprotocol_reply == entry.decode()
    assert TOKEN not in repr(rewrite)


def test_subprotocol_access_token_form_with_a_remaining_offer() -> None:
    headers = [(b"Sec-WebSocket-Protocol", b"access_token.abc, chat")]
    credential, rewrite = find_credential(auth("subprotocol"), upgrade(headers))
    assert credential == Credential(value="abc", source="subprotocol")
    assert extra_headers(rewrite) == [(b"Sec-WebSocket-Protocol", b"chat")]
    assert rewrite.subprotocol_reply is None


def test_subprotocol_offer_without_credential_is_untouched() -> None:
    headers = [(b"Sec-WebSocket-Protocol", b"chat,  v2"), (b"Sec-WebSocket-Protocol", b"bearer")]
    credential, rewrite = find_credential(auth("subprotocol"), upgrade(headers))
    assert credential is None
    assert extra_headers(rewrite) == headers
    assert rewrite.subprotocol_reply is None


ALL_SOURCES = ("header", "cookie:session", "query:access_token", "subprotocol")
EVERYWHERE = (
    [
        (b"Authorization", b"Bearer from-header"),
        (b"Cookie", b"session=from-cookie; keep=1"),
        (b"Sec-WebSocket-Protocol", b"bearer, from-subprotocol"),
    ],
    b"/ws?access_token=from-query&keep=1",
)


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (ALL_SOURCES, "from-header"),
        (("cookie:session", "header"), "from-cookie"),
        (("query:access_token", "header", "subprotocol"), "from-query"),
        (("subprotocol", "cookie:session"), "from-subprotocol"),
    ],
)
def test_the_first_configured_source_wins(sources: tuple[str, ...], expected: str) -> None:
    headers, target = EVERYWHERE
    credential, rewrite = find_credential(auth(*sources), upgrade(headers, target))
    assert credential is not None and credential.value == expected
    assert expected not in repr(rewrite)


def test_every_configured_source_is_emptied_upstream() -> None:
    headers, target = EVERYWHERE
    credential, rewrite = find_credential(auth(*ALL_SOURCES), upgrade(headers, target))
    assert credential is not None and credential.source == "header"
    assert extra_headers(rewrite) == [(b"Cookie", b"keep=1")]
    assert rewrite.target == b"/ws?keep=1"
    assert rewrite.subprotocol_reply == "bearer"
    assert b"from-" not in repr(rewrite).encode()


def test_unconfigured_sources_pass_untouched() -> None:
    headers, target = EVERYWHERE
    credential, rewrite = find_credential(auth("cookie:other"), upgrade(headers, target))
    assert credential is None
    assert extra_headers(rewrite) == headers
    assert rewrite.target == target


def test_no_credentials_is_401_with_a_bare_challenge() -> None:
    credential, _ = find_credential(auth(*ALL_SOURCES), upgrade())
    assert credential is None
    assert missing_credentials() == Rejection(401, "missing credentials", ((b"WWW-Authenticate", b"Bearer"),))


def test_unknown_source_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown auth source"):
        find_credential(auth("form:token"), upgrade())


def test_spoofed_identity_and_claim_headers_are_removed() -> None:
    headers = [
        (b"X-Auth-Subject", b"admin"),
        (b"x_auth_subject", b"admin"),
        (b"X-AUTH-CLAIM-ROLE", b"root"),
        (b"X_Auth_Claim_Tenant", b"other"),
        (b"X-Auth-Claim-Anything", b"x"),
        (b"X-User", b"kept"),
        (b"X-Auth-Claimx", b"kept"),
    ]
    _, rewrite = find_credential(auth("header"), upgrade(headers))
    assert extra_headers(rewrite) == [(b"X-User", b"kept"), (b"X-Auth-Claimx", b"kept")]


def test_custom_identity_header_is_removed_with_its_underscore_twin() -> None:
    headers = [(b"X-Remote-User", b"admin"), (b"X_REMOTE_USER", b"admin"), (b"X-Auth-Subject", b"kept")]
    _, rewrite = find_credential(auth("header", identity_header="X-Remote-User"), upgrade(headers))
    assert extra_headers(rewrite) == [(b"X-Auth-Subject", b"kept")]


CREDENTIAL_PLACES = {
    "header": ([(b"Authorization", b"Bearer " + TOKEN.encode())], b"/ws"),
    "cookie:session": ([(b"Cookie", b"a=1; session=" + TOKEN.encode())], b"/ws"),
    "query:access_token": ([], b"/ws?a=1&access_token=" + TOKEN.encode()),
    "subprotocol": ([(b"Sec-WebSocket-Protocol", b"chat, bearer, " + TOKEN.encode())], b"/ws"),
}


@pytest.mark.parametrize("source", CREDENTIAL_PLACES)
def test_the_credential_never_shows(source: str) -> None:
    headers, target = CREDENTIAL_PLACES[source]
    credential, rewrite = find_credential(auth(source), upgrade(headers, target))
    assert credential is not None and credential.value == TOKEN and credential.source == source
    assert repr(credential) == f"Credential(source={source!r}, value=<redacted>)"
    assert TOKEN.encode() not in rewrite.target
    assert all(TOKEN.encode() not in value for _, value in rewrite.headers)
    rejections = [verify_tokens(auth(source, tokens=_tokens("x")), credential), _jwt_result(credential)]
    assert_no_leak(TOKEN, credential, rewrite, *rejections)


def _jwt_result(credential: Credential) -> Principal | Rejection:
    config = _jwt_config(("HS256",), secret=SECRET)
    return verify_jwt(auth(mode="jwt", jwt=config), credential, NOW)


# --- static tokens --------------------------------------------------------------------------


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _tokens(*names: str, token_of: Callable[[str], str] = lambda name: f"token-of-{name}") -> tuple[TokenConfig, ...]:
    return tuple(TokenConfig(name=name, sha256=_digest(token_of(name))) for name in names)


TOKENS = auth("header", tokens=_tokens("ci-bot", "deployer", "monitor"))


def test_right_token_names_the_principal() -> None:
    principal = verify_tokens(TOKENS, Credential(value="token-of-deployer", source="header"))
    assert principal == Principal(identity="deployer", claims={})
    assert identity_headers(TOKENS, principal) == [(b"X-Auth-Subject", b"deployer")]


@pytest.mark.parametrize("value", ["token-of-nobody", "token-of-deployer ", "TOKEN-OF-DEPLOYER", "x"])
def test_wrong_token_is_invalid(value: str) -> None:
    rejection = verify_tokens(TOKENS, Credential(value=value, source="header"))
    assert rejection == Rejection(401, "unknown token", INVALID_TOKEN)


def test_no_configured_tokens_reject_everything() -> None:
    rejection = verify_tokens(auth("header"), Credential(value="anything", source="header"))
    assert isinstance(rejection, Rejection) and rejection.status == 401


@pytest.mark.parametrize("value", ["token-of-ci-bot", "token-of-monitor", "token-of-nobody"])
def test_every_entry_is_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    verify_tokens(TOKENS, Credential(value=value, source="header"))
    assert len(calls) == len(TOKENS.tokens)  # no early exit, whether the first, the last or none matches
    assert [b for _, b in calls] == [t.sha256 for t in TOKENS.tokens]
    assert all(a == _digest(value) for a, _ in calls)


def test_tokens_end_to_end_from_a_cookie() -> None:
    config = auth("header", "cookie:session", tokens=_tokens("ci-bot"))
    headers = [(b"Cookie", b"session=token-of-ci-bot"), (b"X-Auth-Subject", b"admin")]
    credential, rewrite = find_credential(config, upgrade(headers))
    assert credential is not None
    principal = verify_tokens(config, credential)
    assert isinstance(principal, Principal)
    upstream = extra_headers(rewrite) + identity_headers(config, principal)
    assert upstream == [(b"X-Auth-Subject", b"ci-bot")]


def test_parse_tokens_file() -> None:
    text = f"# rotated 2024-05\n\nci-bot {_digest('a').hex()}\n  deployer\t{_digest('b').hex().upper()}  \n"
    assert parse_tokens_file(text) == [
        TokenConfig(name="ci-bot", sha256=_digest("a")),
        TokenConfig(name="deployer", sha256=_digest("b")),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ci-bot\n", 'line 1: expected "NAME SHA256HEX", got 1 fields'),
        (f"# c\nci-bot {'0' * 64} extra\n", "line 2: expected"),
        (f"a {'0' * 64}\n\nb {'0' * 63}\n", "line 3: the digest of 'b' is not 64 hex digits"),
        (f"a {'g' * 64}\n", "line 1: the digest of 'a' is not 64 hex digits"),
        (f"a {'0' * 64}\nb {'0' * 64}\n", "line 2: the digest of 'b' repeats line 1"),
        (f"a\x07b {'0' * 64}\n", "line 1: the name contains control characters"),
    ],
)
def test_parse_tokens_file_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        parse_tokens_file(text)


def test_parse_tokens_file_never_echoes_the_digest_field() -> None:
    with pytest.raises(ValueError) as info:
        parse_tokens_file(f"ci-bot {TOKEN}\n")  # someone pasted the token itself
    assert TOKEN not in str(info.value)


# --- JWT: keys made here -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def pem(private_key: Any) -> bytes:
    public: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return public


def _jwt_config(
    algorithms: Sequence[str],
    *,
    pem_keys: Sequence[bytes] = (),
    jwks: bytes | None = None,
    secret: bytes | None = None,
    **fields: Any,
) -> JwtConfig:
    config = JwtConfig(algorithms=tuple(algorithms), **fields)
    material = load_jwt_keys(config, pem_keys=pem_keys, jwks=jwks, secret=secret)
    return dataclasses.replace(config, key_material=material)


def jwt_auth(algorithms: Sequence[str], **kwargs: Any) -> AuthConfig:
    return AuthConfig(mode="jwt", sources=("header",), jwt=_jwt_config(algorithms, **kwargs))


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": int(NOW) + 300, "iat": int(NOW) - 10}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict[str, Any], key: Any, algorithm: str, **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers or None)


def check(config: AuthConfig, token: str, now: float = NOW) -> Principal | Rejection:
    return verify_jwt(config, Credential(value=token, source="header"), now)


def rejected(result: Principal | Rejection, reason: str, token: str) -> None:
    """A 401 invalid_token whose log reason is ``reason`` and holds nothing of the token's signature."""
    assert isinstance(result, Rejection), result
    assert (result.status, result.headers) == (401, INVALID_TOKEN)
    assert result.reason == reason
    signature = token.rsplit(".", 1)[-1]
    assert token not in result.reason and (not signature or signature not in result.reason)


def accepted(result: Principal | Rejection, identity: str = "alice") -> Principal:
    assert isinstance(result, Principal), result
    assert result.identity == identity
    return result


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def handmade(header: dict[str, Any], payload: dict[str, Any], sign_with: Callable[[bytes], bytes]) -> str:
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return signing_input + "." + b64(sign_with(signing_input.encode()))


# --- JWT: algorithms and keys -------------------------------------------------------------


def test_hs256_with_a_secret() -> None:
    config = jwt_auth(["HS256"], secret=SECRET + b"\n")  # the file's trailing newline is not the secret
    principal = accepted(check(config, sign(claims(role="admin"), SECRET, "HS256")))
    assert principal.claims["role"] == "admin"


def test_rs256_with_a_pem_key(rsa_key: rsa.RSAPrivateKey) -> None:
    config = jwt_auth(["RS256"], pem_keys=[pem(rsa_key)])
    accepted(check(config, sign(claims(), rsa_key, "RS256")))


def test_ps256_with_the_same_rsa_key(rsa_key: rsa.RSAPrivateKey) -> None:
    config = jwt_auth(["RS256", "PS256"], pem_keys=[pem(rsa_key)])
    accepted(check(config, sign(claims(), rsa_key, "PS256")))


def test_es256_with_a_pem_key(ec_key: ec.EllipticCurvePrivateKey) -> None:
    config = jwt_auth(["ES256"], pem_keys=[pem(ec_key)])
    accepted(check(config, sign(claims(), ec_key, "ES256")))


def test_eddsa_with_a_pem_key(ed_key: ed25519.Ed25519PrivateKey) -> None:
    config = jwt_auth(["EdDSA"], pem_keys=[pem(ed_key)])
    accepted(check(config, sign(claims(), ed_key, "EdDSA")))


def test_several_pem_keys_are_each_tried(rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey) -> None:
    config = jwt_auth(["RS256"], pem_keys=[pem(rsa_key), pem(rsa_key2)])
    accepted(check(config, sign(claims(), rsa_key2, "RS256")))


def test_signature_by_another_key_is_invalid(rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey) -> None:
    config = jwt_auth(["RS256"], pem_keys=[pem(rsa_key)])
    token = sign(claims(), rsa_key2, "RS256")
    rejected(check(config, token), "jwt signature invalid", token)


def test_tampered_payload_is_invalid() -> None:
    config = jwt_auth(["HS256"], secret=SECRET)
    header, _, signature = sign(claims(), SECRET, "HS256").split(".")
    token = ".".join([header, b64(json.dumps(claims(sub="admin")).encode()), signature])
    rejected(check(config, token), "jwt signature invalid", token)


def jwks_document(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> bytes:
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    enc_jwk = {**rsa_jwk, "kid": "enc-1", "use": "enc", "alg": "RSA-OAEP"}  # skipped: not for signatures
    return json.dumps({"keys": [{**rsa_jwk, "kid": "k1"}, {**ec_jwk, "kid": "k2"}, enc_jwk]}).encode()


@pytest.fixture(scope="module")
def jwks_auth(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> AuthConfig:
    return jwt_auth(["RS256", "ES256"], jwks=jwks_document(rsa_key, ec_key))


def test_jwks_kid_picks_the_key(
    jwks_auth: AuthConfig, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    material = jwks_auth.jwt.key_material if jwks_auth.jwt else None
    assert isinstance(material, JwtKeys) and sorted(material.by_kid) == ["k1", "k2"]
    accepted(check(jwks_auth, sign(claims(), rsa_key, "RS256", kid="k1")))
    accepted(check(jwks_auth, sign(claims(), ec_key, "ES256", kid="k2")))


def test_jwks_unknown_kid(jwks_auth: AuthConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(claims(), rsa_key, "RS256", kid="k9")
    rejected(check(jwks_auth, token), "kid 'k9' not in jwks", token)


def test_jwks_kid_of_another_key(jwks_auth: AuthConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(claims(), rsa_key, "RS256", kid="k2")  # k2 is the EC key
    rejected(check(jwks_auth, token), "kid 'k2' cannot verify alg RS256", token)


def test_jwks_encryption_key_is_not_used(jwks_auth: AuthConfig, rsa_key: rsa.RSAPrivateKey) -> None:
    token = sign(claims(), rsa_key, "RS256", kid="enc-1")
    rejected(check(jwks_auth, token), "kid 'enc-1' not in jwks", token)


def test_jwks_without_kid_tries_each_key_of_the_family(
    jwks_auth: AuthConfig, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey, rsa_key2: rsa.RSAPrivateKey
) -> None:
    accepted(check(jwks_auth, sign(claims(), rsa_key, "RS256")))
    accepted(check(jwks_auth, sign(claims(), ec_key, "ES256")))
    token = sign(claims(), rsa_key2, "RS256")
    rejected(check(jwks_auth, token), "jwt signature invalid", token)


def test_kid_is_ignored_without_a_jwks(rsa_key: rsa.RSAPrivateKey) -> None:
    config = jwt_auth(["RS256"], pem_keys=[pem(rsa_key)])
    accepted(check(config, sign(claims(), rsa_key, "RS256", kid="whatever")))


def test_jwks_oct_key_serves_hs256(rsa_key: rsa.RSAPrivateKey) -> None:
    document = {"keys": [{"kty": "oct", "kid": "h1", "k": b64(SECRET)}, {**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "r1"}]}
    config = jwt_auth(["HS256", "RS256"], jwks=json.dumps(document).encode())
    accepted(check(config, sign(claims(), SECRET, "HS256", kid="h1")))
    token = sign(claims(), SECRET, "HS256", kid="r1")
    rejected(check(config, token), "kid 'r1' cannot verify alg HS256", token)


def test_alg_none_is_never_accepted() -> None:
    config = jwt_auth(["HS256"], secret=SECRET)
    token = jwt.encode(claims(), "", algorithm="none")
    rejected(check(config, token), "alg none not allowed", token)
    token = handmade({"alg": "None", "typ": "JWT"}, claims(), lambda _: b"")
    rejected(check(config, token), "alg 'None' not allowed", token)


def test_alg_not_in_the_list(rsa_key: rsa.RSAPrivateKey) -> None:
    config = jwt_auth(["RS256"], pem_keys=[pem(rsa_key)])
    token = sign(claims(), SECRET, "HS256")
    rejected(check(config, token), "alg HS256 not allowed", token)
    token = sign(claims(), rsa_key, "RS512")
    rejected(check(config, token), "alg RS512 not allowed", token)


def test_rsa_public_key_as_hmac_secret_is_rejected(rsa_key: rsa.RSAPrivateKey) -> None:
    """The classic RS/HS confusion: HS256 "signed" with the RSA public key's PEM bytes."""
    public_pem = pem(rsa_key)
    token = handmade(
        {"alg": "HS256", "typ": "JWT"}, claims(sub="admin"), lambda data: hmac.new(public_pem, data, hashlib.sha256).digest()
    )
    # HS256 allowed but the only key is RSA: no key serves HS256.
    rejected(check(jwt_auth(["RS256", "HS256"], pem_keys=[public_pem]), token), "no key for alg HS256", token)
    # With a real secret too, the RSA key is still never used as an HMAC key.
    config = jwt_auth(["RS256", "HS256"], pem_keys=[public_pem], secret=SECRET)
    rejected(check(config, token), "jwt signature invalid", token)
    # And the JWKS path: an RSA kid cannot verify HS256.
    document = {"keys": [{**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "r1"}]}
    kid_token = handmade(
        {"alg": "HS256", "kid": "r1"}, claims(sub="admin"), lambda data: hmac.new(public_pem, data, hashlib.sha256).digest()
    )
    config = jwt_auth(["RS256", "HS256"], jwks=json.dumps(document).encode(), secret=SECRET)
    rejected(check(config, kid_token), "kid 'r1' cannot verify alg HS256", kid_token)


def test_es256_token_is_not_verified_by_an_rsa_key(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    config = jwt_auth(["RS256", "ES256"], pem_keys=[pem(rsa_key)])
    token = sign(claims(), ec_key, "ES256")
    rejected(check(config, token), "no key for alg ES256", token)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("garbage", "jwt malformed: 1 dot-separated parts, not 3"),
        ("a.b.c.d.e", "jwt malformed: 5 dot-separated parts, not 3"),
        ("..", "jwt malformed: the header is not base64url JSON object"),
        ("!!!.e30.e30", "jwt malformed: the header is not base64url JSON object"),
        (b64(b"[1]") + ".e30.", "jwt malformed: the header is not base64url JSON object"),
        (b64(b'{"typ":"JWT"}') + ".e30.", "alg None not allowed"),
        (b64(b'{"alg":"HS256"}') + ".%%%.sig", "jwt malformed: payload or signature is not base64url"),
        (b64(b'{"alg":"HS256"}') + ".e30.", "jwt signature invalid"),
        ("é.é.é", "jwt malformed: the header is not base64url JSON object"),
    ],
)
def test_garbage_tokens(token: str, reason: str) -> None:
    result = check(jwt_auth(["HS256"], secret=SECRET), token)
    assert isinstance(result, Rejection) and (result.status, result.headers, result.reason) == (401, INVALID_TOKEN, reason)


def test_crit_header_is_refused() -> None:
    token = sign(claims(), SECRET, "HS256", crit=["exp"])
    rejected(check(jwt_auth(["HS256"], secret=SECRET), token), "jwt header has crit ['exp']: no extension is supported", token)


def test_payload_that_is_not_an_object() -> None:
    token = handmade({"alg": "HS256"}, [], lambda data: hmac.new(SECRET, data, hashlib.sha256).digest())  # type: ignore[arg-type]
    rejected(check(jwt_auth(["HS256"], secret=SECRET), token), "jwt payload is not a JSON object", token)


# --- JWT: claims ---------------------------------------------------------------------------


HS = jwt_auth(["HS256"], secret=SECRET, leeway_s=30.0)


def hs(**overrides: Any) -> str:
    return sign(claims(**overrides), SECRET, "HS256")


def test_expired() -> None:
    token = hs(exp=int(NOW) - 120)
    rejected(check(HS, token), "jwt expired 120s ago", token)


def test_expired_within_leeway_is_accepted() -> None:
    accepted(check(HS, hs(exp=int(NOW) - 29)))
    token = hs(exp=int(NOW) - 30)  # RFC 7519 §4.1.4: on or after exp (+ leeway) is too late
    rejected(check(HS, token), "jwt expired 30s ago", token)


def test_zero_leeway() -> None:
    config = jwt_auth(["HS256"], secret=SECRET, leeway_s=0.0)
    token = hs(exp=int(NOW))
    rejected(check(config, token), "jwt expired 0s ago", token)
    accepted(check(config, hs(exp=int(NOW) + 1)))


@pytest.mark.parametrize(
    ("exp", "reason"),
    [
        (None, "jwt has no exp claim"),
        ("2030-01-01", "jwt exp is not a number: '2030-01-01'"),
        (True, "jwt exp is not a number: True"),
        (float("nan"), "jwt payload is not JSON"),  # json.dumps writes NaN, which is not JSON
        (float("inf"), "jwt payload is not JSON"),
        (10**400, "jwt exp is not a number: " + repr(10**400)[:59] + "…"),
    ],
)
def test_exp_required_and_numeric(exp: Any, reason: str) -> None:
    token = hs(exp=exp)
    rejected(check(HS, token), reason, token)


def test_nbf_in_the_future() -> None:
    token = hs(nbf=int(NOW) + 120)
    rejected(check(HS, token), "jwt not valid yet: nbf is 120s ahead", token)
    accepted(check(HS, hs(nbf=int(NOW) + 20)))  # within leeway
    accepted(check(HS, hs(nbf=int(NOW) - 20)))
    token = hs(nbf="soon")
    rejected(check(HS, token), "jwt nbf is not a number: 'soon'", token)


AUD = jwt_auth(["HS256"], secret=SECRET, audience="chat", issuer="https://auth.example.com")


def test_audience_and_issuer_accepted() -> None:
    accepted(check(AUD, hs(aud="chat", iss="https://auth.example.com")))
    accepted(check(AUD, hs(aud=["billing", "chat"], iss="https://auth.example.com")))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"aud": "x", "iss": "https://auth.example.com"}, "jwt audience mismatch: got 'x'"),
        ({"aud": ["x", "y"], "iss": "https://auth.example.com"}, "jwt audience mismatch: got ['x', 'y']"),
        ({"aud": "Chat", "iss": "https://auth.example.com"}, "jwt audience mismatch: got 'Chat'"),
        ({"aud": 7, "iss": "https://auth.example.com"}, "jwt aud is not a string or list of strings: 7"),
        ({"iss": "https://auth.example.com"}, "jwt has no aud claim"),
        ({"aud": "chat", "iss": "https://evil.example.com"}, "jwt issuer mismatch: got 'https://evil.example.com'"),
        ({"aud": "chat"}, "jwt has no iss claim"),
    ],
)
def test_audience_and_issuer_rejected(overrides: dict[str, Any], reason: str) -> None:
    token = hs(**overrides)
    rejected(check(AUD, token), reason, token)


def test_aud_without_a_configured_audience_is_refused() -> None:
    token = hs(aud="billing")  # RFC 7519 §4.1.3: we are not the audience it names
    rejected(check(HS, token), "jwt has aud 'billing' but the route names no audience", token)


def test_iss_is_not_checked_unless_configured() -> None:
    accepted(check(HS, hs(iss="anyone")))


@pytest.mark.parametrize(
    ("sub", "reason"),
    [
        (None, "jwt has no 'sub' claim"),
        ({"id": 1}, "jwt claim 'sub' is not a string or integer: {'id': 1}"),
        (True, "jwt claim 'sub' is not a string or integer: True"),
        (1.5, "jwt claim 'sub' is not a string or integer: 1.5"),
        ("", "jwt claim 'sub' is not usable as a header value: ''"),
        ("alice\r\nX-Admin: 1", "jwt claim 'sub' is not usable as a header value: 'alice\\r\\nX-Admin: 1'"),
        (" admin", "jwt claim 'sub' is not usable as a header value: ' admin'"),
    ],
)
def test_identity_claim_must_be_a_clean_string_or_int(sub: Any, reason: str) -> None:
    token = hs(sub=sub)
    rejected(check(HS, token), reason, token)


def test_identity_claim_is_configurable_and_ints_become_text() -> None:
    config = jwt_auth(["HS256"], secret=SECRET, identity_claim="uid")
    principal = accepted(check(config, hs(uid=42)), identity="42")
    assert identity_headers(config, principal) == [(b"X-Auth-Subject", b"42")]
    accepted(check(config, hs(uid="bob")), identity="bob")


def test_pass_claims_headers() -> None:
    config = AuthConfig(
        mode="jwt",
        identity_header="X-User",
        jwt=_jwt_config(
            ["HS256"],
            secret=SECRET,
            pass_claims=("tenant", "role", "org_id", "user-level", "ratio", "admin", "groups", "meta", "mixed", "absent", "evil", "empty", "name"),
        ),
    )
    token = hs(
        tenant="acme",
        role=7,
        org_id="o-1",
        **{"user-level": 3},
        ratio=0.5,
        admin=False,
        groups=["a", "b", 3, True],
        meta={"x": 1},
        mixed=["a", {"b": 1}],
        evil="x\r\nX-Auth-Subject: root",
        empty=[],
        name="Zoë",
    )
    principal = accepted(check(config, token))
    assert identity_headers(config, principal) == [
        (b"X-User", b"alice"),
        (b"X-Auth-Claim-Tenant", b"acme"),
        (b"X-Auth-Claim-Role", b"7"),
        (b"X-Auth-Claim-Org-Id", b"o-1"),
        (b"X-Auth-Claim-User-Level", b"3"),
        (b"X-Auth-Claim-Ratio", b"0.5"),
        (b"X-Auth-Claim-Admin", b"false"),
        (b"X-Auth-Claim-Groups", b"a,b,3,true"),
        (b"X-Auth-Claim-Empty", b""),
        (b"X-Auth-Claim-Name", "Zoë".encode()),
    ]


@pytest.mark.parametrize(
    ("claim", "header"),
    [("tenant", "X-Auth-Claim-Tenant"), ("org_id", "X-Auth-Claim-Org-Id"), ("USER-role", "X-Auth-Claim-User-Role")],
)
def test_claim_header_name(claim: str, header: str) -> None:
    assert claim_header_name(claim) == header


def test_jwt_end_to_end_from_the_subprotocol() -> None:
    config = AuthConfig(mode="jwt", sources=("header", "subprotocol"), jwt=_jwt_config(["HS256"], secret=SECRET, pass_claims=("tenant",)))
    token = hs(tenant="acme")
    headers = [(b"Sec-WebSocket-Protocol", b"bearer, " + token.encode()), (b"X-Auth-Claim-Tenant", b"other")]
    credential, rewrite = find_credential(config, upgrade(headers))
    assert credential is not None and credential.source == "subprotocol"
    principal = verify_jwt(config, credential, NOW)
    assert isinstance(principal, Principal)
    upstream = extra_headers(rewrite) + identity_headers(config, principal)
    assert upstream == [(b"X-Auth-Subject", b"alice"), (b"X-Auth-Claim-Tenant", b"acme")]
    assert rewrite.subprotocol_reply == "bearer"


def test_verify_jwt_without_loaded_keys_fails_closed() -> None:
    config = AuthConfig(mode="jwt", jwt=JwtConfig(algorithms=("HS256",)))
    result = verify_jwt(config, Credential(value=hs(), source="header"), NOW)
    assert isinstance(result, Rejection) and result.status == 500


# --- load_jwt_keys ---------------------------------------------------------------------------


def _public_pem(key: Any) -> bytes:
    data: bytes = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _private_pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return data


def load(algorithms: Sequence[str], **kwargs: Any) -> JwtKeys:
    config = JwtConfig(algorithms=tuple(algorithms), keys=tuple(f"/k/{i}.pem" for i in range(len(kwargs.get("pem_keys", ())))))
    kwargs.setdefault("pem_keys", ())
    kwargs.setdefault("jwks", None)
    kwargs.setdefault("secret", None)
    return load_jwt_keys(config, **kwargs)


def test_load_keys_families(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    material = load(["RS256", "PS512", "ES256", "HS256", "HS512"], pem_keys=[pem(rsa_key), pem(ec_key)], secret=SECRET)
    assert [sorted(k.algorithms) for k in material.keys] == [["PS512", "RS256"], ["ES256"], ["HS256"]]  # 52 bytes: too short for HS512
    assert SECRET.decode() not in repr(material)


def test_load_certificate_pem(rsa_key: rsa.RSAPrivateKey) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(rsa_key.public_key())
        .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=1))
        .sign(rsa_key, hashes.SHA256())
    )
    config = AuthConfig(mode="jwt", jwt=_jwt_config(["RS256"], pem_keys=[cert.public_bytes(serialization.Encoding.PEM)]))
    accepted(check(config, sign(claims(), rsa_key, "RS256")))


@pytest.fixture(scope="module")
def odd_keys() -> dict[str, bytes]:
    return {
        "dsa": _public_pem(dsa.generate_private_key(key_size=2048).public_key()),
        "x25519": _public_pem(x25519.X25519PrivateKey.generate().public_key()),
        "p384": _public_pem(ec.generate_private_key(ec.SECP384R1()).public_key()),
        "secp256k1": _public_pem(ec.generate_private_key(ec.SECP256K1()).public_key()),
        "rsa1024": _public_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()),
        "ec_private": _private_pem(ec.generate_private_key(ec.SECP256R1())),
    }


@pytest.mark.parametrize(
    ("name", "algorithms", "message"),
    [
        ("dsa", ["RS256"], "keys[0] (/k/0.pem): unsupported key type"),
        ("x25519", ["EdDSA"], "keys[0] (/k/0.pem): unsupported key type"),
        ("p384", ["ES256"], "keys[0] (/k/0.pem): an EC secp384r1 key (ES384), but algorithms lists none it can verify: ES256"),
        ("secp256k1", ["ES256"], "keys[0] (/k/0.pem): unsupported EC curve secp256k1"),
        ("rsa1024", ["RS256"], "keys[0] (/k/0.pem): the RSA key has 1024 bits; at least 2048 are needed"),
        ("ec_private", ["ES256"], "keys[0] (/k/0.pem): a private key; give the public key only"),
    ],
)
def test_load_pem_errors(odd_keys: dict[str, bytes], name: str, algorithms: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        load(algorithms, pem_keys=[odd_keys[name]])
    assert str(info.value).startswith(message)


def test_load_not_pem() -> None:
    with pytest.raises(ValueError, match=r"^keys\[0\] \(/k/0.pem\): not a PEM public key or certificate$"):
        load(["RS256"], pem_keys=[b"hello"])


def test_load_family_mismatch(rsa_key: rsa.RSAPrivateKey, ed_key: ed25519.Ed25519PrivateKey) -> None:
    with pytest.raises(ValueError, match=r"an RSA key \(RS\*, PS\*\), but algorithms lists none it can verify: ES256, HS256"):
        load(["ES256", "HS256"], pem_keys=[pem(rsa_key)])
    with pytest.raises(ValueError, match="an EdDSA key, but algorithms lists none"):
        load(["ES256"], pem_keys=[pem(ed_key)])
    with pytest.raises(ValueError, match="^secret_file: an HMAC secret, but algorithms lists none it can verify: RS256$"):
        load(["RS256"], secret=SECRET)


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        (b"", "secret_file: empty"),
        (b"\r\n", "secret_file: empty"),
        (b"short", "secret_file: the secret is 5 bytes; RFC 7518 §3.2 needs at least 32"),
    ],
)
def test_load_secret_errors(secret: bytes, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message + "$"):
        load(["HS256"], secret=secret)


def test_load_pem_as_secret_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ValueError, match="looks like a public key, not an HMAC secret"):
        load(["HS256"], secret=pem(rsa_key))


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"{not json", "jwks_file: not JSON"),
        (b"[]", 'jwks_file: expected a JSON object with a "keys" list'),
        (b'{"keys": {}}', 'jwks_file: expected a JSON object with a "keys" list'),
        (b'{"keys": [1]}', r"jwks_file: keys\[0\]: not a JSON object"),
        (b'{"keys": [{"kty": "RSA", "kid": 5}]}', r"jwks_file: keys\[0\]: kid is not a string"),
        (b'{"keys": [{"kty": "DSA", "kid": "a"}]}', r"jwks_file: keys\[0\] \(kid 'a'\): unsupported kty 'DSA'"),
        (b'{"keys": [{"kid": "a"}]}', r"jwks_file: keys\[0\] \(kid 'a'\): unsupported kty None"),
        (b'{"keys": [{"kty": "RSA", "e": "AQAB"}]}', r"jwks_file: keys\[0\]: invalid RSA key"),
        (b'{"keys": [{"kty": "oct", "k": ""}]}', r"jwks_file: keys\[0\]: invalid oct key"),
    ],
)
def test_load_jwks_errors(document: bytes, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message):
        load(["RS256", "HS256"], jwks=document)


def test_load_jwks_entry_errors(rsa_key: rsa.RSAPrivateKey) -> None:
    public = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    private = json.loads(RSAAlgorithm.to_jwk(rsa_key))
    cases = [
        ({"keys": [{**private, "kid": "p"}]}, "a private key; give the public key only"),
        ({"keys": [{**public, "kid": "a"}, {**public, "kid": "a"}]}, "kid 'a' appears twice"),
        ({"keys": [{**public, "kid": "a", "alg": "RS512"}]}, "alg 'RS512' is not a listed algorithm this key can verify"),
        ({"keys": [{**public, "kid": "a", "alg": "HS256"}]}, "alg 'HS256' is not a listed algorithm"),
        ({"keys": [{**public, "kid": "a", "alg": ["RS256"]}]}, r"alg \['RS256'\] is not a listed algorithm"),
        ({"keys": [{**public, "kid": "a"}]}, r"an RSA key \(RS\*, PS\*\), but algorithms lists none it can verify: ES256"),
    ]
    for document, message in cases:
        algorithms = ["ES256"] if "ES256" in message else ["RS256", "HS256"]
        with pytest.raises(ValueError, match=message):
            load(algorithms, jwks=json.dumps(document).encode())


def test_load_jwks_alg_narrows_the_key(rsa_key: rsa.RSAPrivateKey) -> None:
    entry = {**json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "a", "alg": "PS256"}
    config = AuthConfig(mode="jwt", jwt=_jwt_config(["RS256", "PS256"], jwks=json.dumps({"keys": [entry]}).encode()))
    accepted(check(config, sign(claims(), rsa_key, "PS256", kid="a")))
    token = sign(claims(), rsa_key, "RS256", kid="a")
    rejected(check(config, token), "kid 'a' cannot verify alg RS256", token)


@pytest.mark.parametrize(
    ("algorithms", "message"),
    [(["none"], "algorithms: 'none' is not supported"), (["HS1"], "algorithms: 'HS1' is not supported"), ([], "algorithms: list at least one")],
)
def test_load_algorithm_errors(algorithms: list[str], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message):
        load(algorithms, secret=SECRET)


def test_load_needs_a_key() -> None:
    with pytest.raises(ValueError, match="^no keys: give keys, jwks_file or secret_file$"):
        load(["RS256"])
    with pytest.raises(ValueError, match="^no keys"):
        load(["RS256"], jwks=b'{"keys": []}')


@pytest.mark.parametrize(
    ("pass_claims", "message"),
    [
        (("https://example.com/roles",), "pass_claims: 'https://example.com/roles' cannot be part of a header name"),
        (("",), "pass_claims: '' cannot be part of a header name"),
        (("a__b",), "pass_claims: 'a__b' cannot be part of a header name"),
        (("org_id", "org-id"), "pass_claims: 'org-id' and 'org_id' are both sent as X-Auth-Claim-Org-Id"),
    ],
)
def test_load_pass_claims_errors(pass_claims: tuple[str, ...], message: str) -> None:
    config = JwtConfig(algorithms=("HS256",), pass_claims=pass_claims)
    with pytest.raises(ValueError) as info:
        load_jwt_keys(config, pem_keys=(), jwks=None, secret=SECRET)
    assert str(info.value) == message


# --- nothing but verdicts escape -------------------------------------------------------------


@given(st.text(min_size=1, max_size=200))
def test_verify_jwt_on_any_text_returns_a_verdict(token: str) -> None:
    result = check(HS, token)
    assert isinstance(result, Rejection) and result.status == 401


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40))
def test_verify_jwt_on_dotted_text_returns_a_verdict(part: str) -> None:
    hs256 = b64(b'{"alg":"HS256"}')
    for token in (f"{part}.{part}.{part}", f"{b64(part.encode())}.{part}.{part}", f"{hs256}.{part}.{part}"):
        assert isinstance(check(HS, token), Rejection)


_VALUE = st.binary(max_size=60).map(lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E and c != 0x2C) or b"x")


@given(cookie=st.lists(_VALUE, max_size=5), protocols=st.lists(_VALUE, max_size=5), query=st.lists(_VALUE, max_size=5))
def test_find_credential_on_any_shape_never_raises(cookie: list[bytes], protocols: list[bytes], query: list[bytes]) -> None:
    headers = [(b"Cookie", b"; ".join(cookie))] if cookie else []
    if protocols:
        headers.append((b"Sec-WebSocket-Protocol", b", ".join(protocols)))
    target = b"/ws?" + b"&".join(q.replace(b"#", b"") for q in query)
    credential, rewrite = find_credential(auth(*ALL_SOURCES), upgrade(headers, target))
    if credential is not None:
        assert repr(credential) == f"Credential(source={credential.source!r}, value=<redacted>)"
    assert isinstance(rewrite.target, bytes) and rewrite.target.startswith(b"/ws")
