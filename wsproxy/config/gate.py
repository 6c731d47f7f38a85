"""The gate's config keys: listener TLS and PROXY protocol, route Origin and auth,
connection and rate limits, trusted proxies, backend TLS.

JWT keys, token files and secrets are read here, at load time, and turned into
what the proxy uses (key material), so a config that names an unreadable or
malformed file is refused like any other bad value, with its position.
Certificates, keys and CA bundles are checked to be readable files here and
kept as paths with the position of their ``tls`` mapping: the edge builds the
SSL contexts from them (``edge.contexts``), and every entry point loads with
``edge.contexts.load_checked``, so an expired or mismatched certificate is
refused at that position too, and a reload validates them all before anything
changes.
"""

from __future__ import annotations

import binascii
import ipaddress

from wsproxy.config.durations import quote
from wsproxy.config.files import MAX_CA_BUNDLE_BYTES
from wsproxy.config.reader import At, Reader, given
from wsproxy.config.schema import (
    AUTH_SOURCES,
    CLIENT_IDENTITIES,
    JWT_ALGORITHMS,
    AuthConfig,
    BackendTlsConfig,
    ForwardAuthConfig,
    JwtConfig,
    RateConfig,
    SniCertConfig,
    TlsConfig,
    TokenConfig,
)

#: RFC 8446 §4.6.1: a ticket lifetime of at most seven days.
MAX_TICKET_LIFETIME_S = 7 * 86400.0


def listener_tls(r: Reader, at: At | None) -> TlsConfig | None:
    fields = r.fields(
        at,
        required=("cert", "key"),
        optional=("sni", "client_ca", "client_cert", "client_identity", "session_ticket_lifetime"),
        what="a tls mapping (cert, key, sni, client_ca, client_cert, client_identity, session_ticket_lifetime)",
    )
    if fields is None:
        return None
    cert = r.tls_file(fields.get("cert"))
    key = r.tls_file(fields.get("key"))
    client_ca = r.tls_file(fields.get("client_ca"), MAX_CA_BUNDLE_BYTES)
    client_cert = r.choice(fields.get("client_cert"), ("required", "optional", "off"), "client_cert")
    ticket_lifetime_s = r.duration_or_zero(fields.get("session_ticket_lifetime"))
    if ticket_lifetime_s is not None and ticket_lifetime_s > MAX_TICKET_LIFETIME_S:  # RFC 8446 §4.6.1: 7 days at most
        r.error(fields["session_ticket_lifetime"], f"session_ticket_lifetime: at most 7d (RFC 8446 §4.6.1), got {ticket_lifetime_s:g}s")
        ticket_lifetime_s = None
    client_identity = r.choice(fields.get("client_identity"), CLIENT_IDENTITIES, "client_identity")
    if client_ca is not None and client_cert is None and "client_cert" not in fields:
        client_cert = "required"  # naming a client CA means mTLS unless said otherwise
    if client_identity is not None and "client_ca" not in fields:
        r.error(fields["client_identity"], "client_identity needs client_ca (without client certificates there is no identity)")
    if client_cert in ("required", "optional") and "client_ca" not in fields:
        r.error(fields.get("client_cert") or at, f"client_cert: {client_cert} needs client_ca (the CA that signs client certificates)")  # type: ignore[arg-type]
        return None
    sni = []
    for item in r.items(fields.get("sni"), "SNI certificates") or []:
        entry = r.fields(item, required=("names", "cert", "key"), what="an SNI entry (names, cert, key)")
        if entry is None:
            continue
        names = r.strings(entry.get("names"), "server names")
        entry_cert = r.tls_file(entry.get("cert"))
        entry_key = r.tls_file(entry.get("key"))
        if names is not None and entry_cert is not None and entry_key is not None:
            sni.append(SniCertConfig(names=tuple(n.lower() for n in names), cert=entry_cert, key=entry_key))
    if at is None or cert is None or key is None or ("client_ca" in fields and client_ca is None):
        return None  # each missing file is reported at its own key already
    return TlsConfig(
        cert=cert,
        key=key,
        sni=tuple(sni),
        client_ca=client_ca,
        where=r.position(at),
        **given(client_cert=client_cert, client_identity=client_identity, session_ticket_lifetime_s=ticket_lifetime_s),
    )


def backend_tls(r: Reader, at: At | None) -> BackendTlsConfig | None:
    """A pool's ``tls`` mapping (its client SSLContext is the edge's: ``edge.contexts.pool_context``)."""
    fields = r.fields(at, optional=("ca", "server_name", "cert", "key"), what="a tls mapping (ca, server_name, cert, key)", null_is_empty=True)
    if at is None or fields is None:
        return None
    tls = BackendTlsConfig(
        ca=r.tls_file(fields.get("ca"), MAX_CA_BUNDLE_BYTES),
        server_name=r.text(fields.get("server_name"), "a server name"),
        cert=r.tls_file(fields.get("cert")),
        key=r.tls_file(fields.get("key")),
        where=r.position(at),
    )
    if (tls.cert is None) != (tls.key is None):
        r.error(at, "cert and key go together")
    return tls


def origins(r: Reader, at: At | None) -> tuple[str, ...] | None:
    values = r.strings(at, "origins")
    if at is None or values is None:
        return None
    from wsproxy.proto.origin import check_origin_pattern

    for index, value in enumerate(values):
        try:
            check_origin_pattern(value)
        except ValueError as exc:
            r.error(At(at.node.value[index], f"{at.path}[{index}]"), str(exc))
    return values


def auth(r: Reader, at: At | None) -> AuthConfig | None:
    fields = r.fields(
        at,
        optional=("sources", "identity_header", "tokens", "tokens_file", "jwt", "forward", "enforce_expiry", "revoked_file"),
        what="an auth mapping (sources, identity_header, enforce_expiry, revoked_file, and one of tokens, jwt, forward)",
    )
    if at is None or fields is None:
        return None
    modes = [m for m in ("tokens", "jwt", "forward") if m in fields or (m == "tokens" and "tokens_file" in fields)]
    if len(modes) != 1:
        r.error(at, f"auth needs exactly one of tokens (or tokens_file), jwt, forward; got {', '.join(modes) or 'none'}")
        return None
    mode = modes[0]
    sources = _sources(r, fields.get("sources"))
    identity_header = r.text(fields.get("identity_header"), "a header name")
    common = given(sources=sources, identity_header=identity_header, **_lifetime(r, fields, mode))
    if mode == "tokens":
        tokens = _tokens(r, fields.get("tokens"), fields.get("tokens_file"))
        return AuthConfig(mode=mode, tokens=tokens, **common)
    if mode == "jwt":
        jwt = _jwt(r, fields["jwt"])
        return AuthConfig(mode=mode, jwt=jwt, **common)
    forward = _forward(r, fields["forward"])
    return AuthConfig(mode=mode, forward=forward, **common)


def _lifetime(r: Reader, fields: dict[str, At], mode: str) -> dict[str, object]:
    """``enforce_expiry`` (jwt only: static tokens do not expire, forward auth has ``lifetime_from``)
    and ``revoked_file`` (read now, so that every reload re-reads it)."""
    from wsproxy.proto.lifetime import parse_revoked

    values: dict[str, object] = {}
    enforce = r.boolean(fields.get("enforce_expiry"))
    if enforce and mode != "jwt":
        hint = "forward auth bounds sessions with forward.lifetime_from" if mode == "forward" else "static tokens do not expire"
        r.error(fields["enforce_expiry"], f"enforce_expiry needs jwt auth ({hint})")
    elif enforce is not None:
        values["enforce_expiry"] = enforce
    read = r.read(fields.get("revoked_file"))
    if read is not None:
        try:
            values["revoked"] = parse_revoked(read[1].decode("utf-8"))
            values["revoked_file"] = read[0]
        except (ValueError, UnicodeDecodeError) as exc:
            r.error(fields["revoked_file"], f"{read[0]}: {exc}")
    return values


def _sources(r: Reader, at: At | None) -> tuple[str, ...] | None:
    values = r.strings(at, "credential sources")
    if at is None or values is None:
        return None
    for index, value in enumerate(values):
        kind, _, name = value.partition(":")
        needs_name = kind in ("cookie", "query")
        if kind not in AUTH_SOURCES or needs_name != bool(name):
            r.error(
                At(at.node.value[index], f"{at.path}[{index}]"),
                f'expected "header", "cookie:NAME", "query:NAME" or "subprotocol", got {quote(value)}',
            )
    return values


def _tokens(r: Reader, at: At | None, file_at: At | None) -> tuple[TokenConfig, ...]:
    from wsproxy.proto.auth import parse_tokens_file

    tokens: list[TokenConfig] = []
    for item in r.items(at, "tokens") or []:
        entry = r.fields(item, required=("name", "sha256"), what="a token (name, sha256)")
        if entry is None:
            continue
        name = r.text(entry.get("name"), "a name")
        digest = r.text(entry.get("sha256"), "a SHA-256 hex digest")
        if name is None or digest is None:
            continue
        try:
            raw = binascii.unhexlify(digest)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            r.error(entry["sha256"], "expected a SHA-256 digest as 64 hex digits (the config never holds a token)")
            continue
        tokens.append(TokenConfig(name=name, sha256=raw))
    read = r.read(file_at)
    if read is not None and file_at is not None:
        try:
            tokens += parse_tokens_file(read[1].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            r.error(file_at, f"{read[0]}: {exc}")
    return tuple(tokens)


_JWKS_KEYS = ("jwks_url", "jwks_refresh", "jwks_min_refresh", "jwks_ca")


def _jwt(r: Reader, at: At) -> JwtConfig | None:
    from wsproxy.proto.jwt import JwksSource, load_jwt_keys

    fields = r.fields(
        at,
        required=("algorithms",),
        optional=("keys", "jwks_file", "secret_file", *_JWKS_KEYS, "issuer", "audience", "leeway", "identity_claim", "pass_claims"),
        what="a jwt mapping (algorithms, keys, jwks_file, secret_file, jwks_url, jwks_refresh, jwks_min_refresh, jwks_ca, "
        "issuer, audience, leeway, identity_claim, pass_claims)",
    )
    if fields is None:
        return None
    algorithms = r.strings(fields.get("algorithms"), "algorithms")
    if algorithms is not None:
        bad = [a for a in algorithms if a not in JWT_ALGORITHMS]
        if bad or not algorithms:
            r.error(fields["algorithms"], f"unknown or refused algorithms {', '.join(bad) or '(none)'} (allowed: {', '.join(JWT_ALGORITHMS)}; never none)")
            algorithms = None
    pem_keys = []
    key_paths = []
    for item in r.items(fields.get("keys"), "PEM public key files") or []:
        read = r.read(item)
        if read is not None:
            key_paths.append(read[0])
            pem_keys.append(read[1])
    jwks = r.read(fields.get("jwks_file"))
    secret = r.read(fields.get("secret_file"))
    jwks_url = _jwks_url(r, fields.get("jwks_url"))
    for name in _JWKS_KEYS[1:]:
        if name in fields and "jwks_url" not in fields:
            r.error(fields[name], f"{name} applies to jwks_url, which is not given")
    refresh_s = r.duration(fields.get("jwks_refresh"))
    min_refresh_s = r.duration(fields.get("jwks_min_refresh"))
    jwks_ca = r.tls_file(fields.get("jwks_ca"), MAX_CA_BUNDLE_BYTES)
    if not pem_keys and jwks is None and secret is None and "jwks_url" not in fields and not r.errors:
        r.error(at, "jwt needs keys, jwks_file, secret_file or jwks_url")
        return None
    config = JwtConfig(
        algorithms=algorithms or ("RS256",),
        keys=tuple(key_paths),
        jwks_file=jwks[0] if jwks else None,
        secret_file=secret[0] if secret else None,
        **given(
            jwks_url=jwks_url,
            jwks_refresh_s=refresh_s,
            jwks_min_refresh_s=min_refresh_s,
            jwks_ca=jwks_ca,
            issuer=r.text(fields.get("issuer"), "an issuer"),
            audience=r.text(fields.get("audience"), "an audience"),
            leeway_s=_leeway(r, fields.get("leeway")),
            identity_claim=r.text(fields.get("identity_claim"), "a claim name"),
            pass_claims=r.strings(fields.get("pass_claims"), "claim names"),
        ),
    )
    if algorithms is None:
        return None
    try:
        material = load_jwt_keys(
            config,
            pem_keys=pem_keys,
            jwks=jwks[1] if jwks else None,
            secret=secret[1].strip() if secret else None,
            allow_none=config.jwks_url is not None,
        )
    except ValueError as exc:
        r.error(at, str(exc))
        return None
    if config.jwks_url is not None:  # fetched by edge.jwks at start and while running
        material = JwksSource(  # type: ignore[assignment]
            url=config.jwks_url,
            algorithms=config.algorithms,
            static=material if material.keys else None,
            refresh_s=config.jwks_refresh_s,
            min_refresh_s=config.jwks_min_refresh_s,
            ca=config.jwks_ca,
        )
    return JwtConfig(
        algorithms=config.algorithms,
        keys=config.keys,
        jwks_file=config.jwks_file,
        secret_file=config.secret_file,
        jwks_url=config.jwks_url,
        jwks_refresh_s=config.jwks_refresh_s,
        jwks_min_refresh_s=config.jwks_min_refresh_s,
        jwks_ca=config.jwks_ca,
        issuer=config.issuer,
        audience=config.audience,
        leeway_s=config.leeway_s,
        identity_claim=config.identity_claim,
        pass_claims=config.pass_claims,
        key_material=material,
    )


def _jwks_url(r: Reader, at: At | None) -> str | None:
    """An https:// URL with a host (TLS is always verified; no credentials in it: it is logged)."""
    from urllib.parse import urlsplit

    text = r.text(at, "an https:// URL")
    if at is None or text is None:
        return None
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme != "https" or not parts.hostname:
        r.error(at, f"expected an https:// URL with a host, got {quote(text)}")
        return None
    if parts.username is not None or parts.password is not None:
        r.error(at, "a URL with credentials in it; the JWKS of an identity provider is public")
        return None
    return text


def _leeway(r: Reader, at: At | None) -> float | None:
    text = r.text(at, "a duration")
    if at is None or text is None:
        return None
    if text in ("0", "0s"):
        return 0.0
    return r.duration(at)


def _forward(r: Reader, at: At) -> ForwardAuthConfig | None:
    from wsproxy.proto.forward_auth import check_header_names, parse_url

    fields = r.fields(
        at,
        required=("url",),
        optional=("send_headers", "copy_headers", "timeout", "cache", "identity_from", "lifetime_from"),
        what="a forward mapping (url, send_headers, copy_headers, timeout, cache, identity_from, lifetime_from)",
    )
    if fields is None:
        return None
    url = r.text(fields.get("url"), "an http:// URL")
    if url is not None:
        try:
            parse_url(url)
        except ValueError as exc:
            r.error(fields["url"], str(exc))
            return None
    cache_at = fields.get("cache")
    cache = 0.0 if cache_at is not None and r.text(cache_at, "a duration") in ("0", "0s", "off") else r.duration(cache_at)
    if url is None:
        return None
    forward = ForwardAuthConfig(
        url=url,
        **given(
            send_headers=r.strings(fields.get("send_headers"), "header names"),
            copy_headers=r.strings(fields.get("copy_headers"), "header names"),
            timeout_s=r.duration(fields.get("timeout")),
            cache_s=cache,
            identity_from=r.text(fields.get("identity_from"), "a header name"),
            lifetime_from=r.text(fields.get("lifetime_from"), "a header name"),
        ),
    )
    try:
        check_header_names(forward)
    except ValueError as exc:
        r.error(fields["identity_from"] if str(exc).startswith("identity_from") else at, str(exc))
        return None
    return forward


def rate(r: Reader, at: At | None) -> RateConfig | None:
    fields = r.fields(at, required=("rate", "burst"), what='a rate mapping (rate: "20/s", burst: 40)')
    if fields is None:
        return None
    from wsproxy.proto.limits import parse_rate

    text = r.text(fields.get("rate"), 'a rate like "20/s", "600/m"')
    burst = r.integer(fields.get("burst"), 1, 1_000_000)
    if text is None or burst is None:
        return None
    try:
        per_s = parse_rate(text)
    except ValueError as exc:
        r.error(fields["rate"], str(exc))
        return None
    return RateConfig(per_s, burst)


def trusted_proxies(r: Reader, at: At | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    values = r.strings(at, "CIDRs")
    if at is None or values is None:
        return None
    networks = []
    for index, value in enumerate(values):
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            r.error(At(at.node.value[index], f"{at.path}[{index}]"), f"expected an address or CIDR like 10.0.0.0/8, got {quote(value)}")
    return tuple(networks)
