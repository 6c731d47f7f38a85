"""The validated, immutable shape of a wsproxy config.

Everything here is a frozen dataclass built once by ``config.load`` from a YAML
file; nothing here reads files or validates input (that is ``load.py``'s job),
and nothing here changes after it is built. A reload builds a whole new
``Config`` and the application swaps one reference.

Units are in the names: ``*_s`` are seconds (float), ``*_bytes`` are bytes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any, NewType

PoolName = NewType("PoolName", str)
ListenerName = NewType("ListenerName", str)

#: The balancing algorithms this version implements (``pools.NAME.balance``).
BALANCE_ALGORITHMS = ("round_robin", "least_conn", "random_two", "hash")

#: Where a sticky key comes from (``pools.NAME.sticky.key``): "cookie:NAME",
#: "header:NAME", "query:NAME", "ip", "claim:NAME", "identity" (the session's, whatever the auth kind).
STICKY_SOURCES = ("cookie", "header", "query", "ip", "claim", "identity")

HEALTH_CHECK_TYPES = ("tcp", "http", "websocket")
IDENTITY_POLICIES = ("refuse", "close_oldest")  # limits.on_identity_limit

#: The record types ``pools.NAME.discovery.type`` may look up.
DISCOVERY_TYPES = ("A", "AAAA", "SRV")

#: Where credentials are looked for (``routes[].auth.sources``): "header"
#: (Authorization: Bearer), "cookie:NAME", "query:NAME", "subprotocol".
AUTH_SOURCES = ("header", "cookie", "query", "subprotocol")

#: What a listener takes as the identity of a client certificate (``listeners[].tls.client_identity``):
#: the subject's CN, or the first URI, DNS or e-mail subjectAltName.
CLIENT_IDENTITIES = ("subject_cn", "san_uri", "san_dns", "san_email")

#: JWT algorithms wsproxy accepts in ``routes[].auth.jwt.algorithms`` ("none" never).
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def hostport(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets: ``[::1]:9000``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint: ``host:port`` or ``[v6]:port`` in the YAML."""

    host: str  # an IP literal (no brackets) or a DNS name
    port: int  # 0 only for listeners: the kernel picks a free port

    def __str__(self) -> str:
        return hostport(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Position:
    """Where a setting was written: for the errors found after loading (``edge.contexts``)."""

    file: str  # the config file, or the included file the setting came from
    line: int  # from 1
    column: int  # from 1
    path: str  # the YAML path, such as "listeners[0].tls"


@dataclass(frozen=True, slots=True, kw_only=True)
class SniCertConfig:
    names: tuple[str, ...]  # exact names or "*.example.com"; lower case
    cert: str  # PEM file: leaf first, then the chain
    key: str  # PEM private key file


@dataclass(frozen=True, slots=True, kw_only=True, weakref_slot=True)
class TlsConfig:
    """TLS termination on a listener: what to build its ``SSLContext`` from (``edge.contexts``).

    The loader checks that the files are there and readable; the edge reads
    them into a context once per ``TlsConfig`` object (``edge.contexts.check_contexts``
    before a config is used: a bad certificate refuses it with the position below).
    """

    cert: str  # the default certificate (PEM, leaf first, then the chain)
    key: str
    sni: tuple[SniCertConfig, ...] = ()  # more certificates, chosen by server name
    client_ca: str | None = None  # PEM CA bundle for client certificates (mTLS)
    client_cert: str = "off"  # required | optional | off
    session_ticket_lifetime_s: float = 3600.0  # ticket keys rotate this often; tickets live this long; 0 = no resumption
    client_identity: str = "subject_cn"  # which part of a client certificate is the identity (CLIENT_IDENTITIES)
    where: Position | None = field(default=None, compare=False, repr=False)  # the tls mapping in the YAML


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    name: ListenerName  # unique; later also the systemd socket's FileDescriptorName
    bind: Address  # where to accept downstream connections
    tls: TlsConfig | None = None  # wss:// when set
    proxy_protocol: str = "off"  # v1 | v2 | off: a PROXY protocol header precedes every connection


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenConfig:
    name: str  # becomes the identity
    sha256: bytes  # SHA-256 digest of the token (32 bytes); the config never holds a token


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtConfig:
    algorithms: tuple[str, ...]  # subset of JWT_ALGORITHMS; a key only serves its own family
    keys: tuple[str, ...] = ()  # PEM public key files
    jwks_file: str | None = None  # a JWKS file; keys chosen by "kid"; "oct" keys serve HS*
    secret_file: str | None = None  # an HS* shared secret
    jwks_url: str | None = None  # https:// JWKS of an identity provider; fetched at start, refreshed (edge.jwks)
    jwks_refresh_s: float = 600.0  # fetched again this often
    jwks_min_refresh_s: float = 10.0  # a token with an unknown kid fetches again at most this often
    jwks_ca: str | None = None  # PEM CA bundle that verifies jwks_url; None = the system store
    issuer: str | None = None
    audience: str | None = None
    leeway_s: float = 30.0
    identity_claim: str = "sub"
    pass_claims: tuple[str, ...] = ()  # sent upstream as X-Auth-Claim-<Name>
    # Key material, read at load time so that a reload re-reads it (opaque here).
    key_material: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardAuthConfig:
    url: str  # http://host:port/path of the auth service
    send_headers: tuple[str, ...] = ("Cookie", "Authorization")
    copy_headers: tuple[str, ...] = ()  # from its 2xx answer into the upstream request
    timeout_s: float = 2.0
    cache_s: float = 0.0  # allow answers cached by the forwarded credentials; 0 = off
    identity_from: str | None = None  # the header of its 2xx answer that names the identity; None = no identity
    lifetime_from: str | None = None  # header of its 2xx answer: seconds the session may live (proto.lifetime)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    mode: str  # tokens | jwt | forward
    sources: tuple[str, ...] = ("header",)  # "header", "cookie:NAME", "query:NAME", "subprotocol"
    identity_header: str = "X-Auth-Subject"
    tokens: tuple[TokenConfig, ...] = ()  # tokens mode: from `tokens` and/or `tokens_file`
    jwt: JwtConfig | None = None
    forward: ForwardAuthConfig | None = None
    enforce_expiry: bool = False  # jwt: close the session (1008) once its token's exp + leeway has passed
    revoked_file: str | None = None  # one jti or subject a line: refused at the gate, closed after a reload
    revoked: frozenset[str] = field(default=frozenset(), repr=False)  # read from revoked_file (every reload re-reads it)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepaliveConfig:
    interval_s: float = 30.0  # the proxy pings both sides this often (at frame boundaries)...
    timeout_s: float = 10.0  # ...and a side whose pong does not come back within this is dead


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    host: str = "*"  # "*", an exact name, or "*.example.com" (one or more leading labels); lower case
    path: str = "/"  # prefix, matched on whole path segments ("/chat" matches "/chat/x", not "/chatroom")
    pool: PoolName  # the pool that serves requests matching this route
    origins: tuple[str, ...] | None = None  # allowed Origins ("https://*.example.com"); None = any
    allow_missing_origin: bool = True  # non-browser clients send no Origin
    auth: AuthConfig | None = None
    keepalive: KeepaliveConfig | None = None  # off when absent
    validate_utf8: bool = True  # text messages and close reasons must be UTF-8 (1007 to the sender)
    backend_failure_close_code: int = 1014  # to the client when the backend fails (1014 or 1011)
    path_ignore_case: bool = False  # the path prefix matches ASCII letters case-insensitively ("/Admin" is "/admin")
    strip_headers: tuple[str, ...] = ()  # client headers never passed upstream, on top of the default list
    strip_headers_default: bool = True  # also strip handshake.DEFAULT_STRIP_HEADERS (client-IP, scheme, URL overrides)
    subprotocols: tuple[str, ...] | None = None  # the client's offer is filtered to these (its order kept); None = any
    subprotocol_required: bool = False  # an empty offer (after credentials are taken out) is refused (400)
    subprotocol: str | None = None  # a match key: the route only takes requests that offer this subprotocol
    client_cert_header: str | None = None  # the client certificate upstream in this header, Envoy's XFCC format
    max_session_age_s: float | None = None  # close with 1012 after this long (±10 %); None = no limit


@dataclass(frozen=True, slots=True, kw_only=True, weakref_slot=True)
class BackendTlsConfig:
    """TLS towards a pool's backends (``pools.NAME.tls``); verification is always on.

    Its client ``SSLContext`` is built by ``edge.contexts``, once per object.
    """

    ca: str | None = None  # PEM CA bundle; None = the system's trust store
    server_name: str | None = None  # SNI and the name to verify; None = the backend's host
    cert: str | None = None  # client certificate for mTLS to the backend
    key: str | None = None
    where: Position | None = field(default=None, compare=False, repr=False)  # the tls mapping in the YAML


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    address: Address  # where the backend accepts WebSocket upgrades
    tls: bool = False  # "wss://host:port" in the YAML, or the pool has a tls mapping
    weight: int = 1  # relative share of new sessions, 1..1000
    max_connections: int = 0  # live sessions at most; a full backend is skipped; 0 = no limit
    source: str = "config"  # "config" (the backends list) | "dns" (found by the pool's discovery)
    priority: int = 0  # SRV priority, lower first: only the best priority with an available backend is used
    name: str | None = None  # a label for people (status page, /status, wsproxy_backend_info); unique in its pool


@dataclass(frozen=True, slots=True, kw_only=True)
class StickyCookieConfig:
    secret: bytes  # read from secret_file at load time (HMAC key; never logged)
    secret_file: str  # where the secret came from, for messages
    max_age_s: float = 86400.0  # the cookie's Max-Age
    same_site: str = "Lax"  # Strict | Lax | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StickyConfig:
    source: str  # one of STICKY_SOURCES
    name: str = ""  # the cookie, header, query parameter or claim name ("" for ip and identity)
    cookie: StickyCookieConfig | None = None  # required when source == "cookie"
    on_unavailable: str = "repick"  # repick | reject (503) when the pinned backend cannot take the session


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    type: str = "tcp"  # one of HEALTH_CHECK_TYPES
    path: str = "/healthz"  # request target of http and websocket checks
    interval_s: float = 5.0  # between two checks of one backend, +-10% jitter
    timeout_s: float = 2.0  # one check, connect included
    rise: int = 2  # consecutive passes to become healthy
    fall: int = 3  # consecutive failures to become unhealthy
    expect_status: tuple[int, ...] = (200,)  # http only
    start_healthy: bool = False  # new backends take traffic before their first pass


@dataclass(frozen=True, slots=True, kw_only=True)
class PassiveHealthConfig:
    failures: int = 3  # connect failures, connect timeouts and failed upgrades within window_s
    window_s: float = 10.0
    ejection_s: float = 30.0  # first ejection; doubles on repeated ejections, capped at 10x
    max_ejected_percent: int = 50  # never more of a pool's backends ejected at once


@dataclass(frozen=True, slots=True, kw_only=True)
class DrainConfig:
    timeout_s: float = 30.0  # a draining backend's sessions continue this long...
    spread_s: float = 20.0  # ...then are closed (1012 to the client, 1001 to the backend) evenly over this
    close_timeout_s: float = 5.0  # the close handshake of a closing session, then TCP closes
    on_unhealthy: bool = False  # also drain a backend when its health checks take it DOWN


@dataclass(frozen=True, slots=True, kw_only=True)
class DiscoveryConfig:
    """Backends from DNS (``pools.NAME.discovery``), looked up by ``control.discovery``."""

    dns: str  # the name to look up, e.g. "chat.default.svc.cluster.local" or "_ws._tcp.chat.service.consul"
    type: str  # one of DISCOVERY_TYPES
    port: int = 0  # A/AAAA: the backends' port (required there); SRV records carry their own
    interval_s: float = 5.0  # the longest time between two lookups; a shorter TTL looks again sooner (>= 1s)
    resolvers: tuple[Address, ...] = ()  # DNS servers to ask (IP literals, UDP then TCP); () = the system's
    on_error: str = "keep"  # keep | empty: the discovered set after a failed lookup


@dataclass(frozen=True, slots=True, kw_only=True)
class RebalanceConfig:
    max_skew: float = 1.25  # a serving backend above max_skew x its fair share of sessions is over-loaded
    rate_per_s: float = 0.01 / 60  # closes (1012, oldest first) at most this share of the pool's sessions per second
    sticky: bool = False  # also on a pool with sticky routing (its clients come back to the same backend)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    name: PoolName
    balance: str = "round_robin"  # one of BALANCE_ALGORITHMS
    backends: tuple[BackendConfig, ...]  # addresses unique; at least one without discovery; found ones included
    hash_balance_factor: int = 0  # hash only: no backend above ceil(factor/100 x mean) sessions; 0 = off, else > 100
    retries: int = 2  # failed connects or upgrades retried on another backend before the client sees an error
    slow_start_s: float = 0.0  # a backend that becomes healthy ramps its weight up over this time; 0 = off
    sticky: StickyConfig | None = None
    health: HealthConfig | None = None  # active checks; None = none (backends count as healthy)
    passive: PassiveHealthConfig | None = None  # passive ejection; None = off
    tls: BackendTlsConfig | None = None  # TLS settings for wss:// backends; None = the system's trust store
    drain: DrainConfig = DrainConfig()
    discovery: DiscoveryConfig | None = None  # backends from DNS, beside (after) the listed ones
    rebalance: RebalanceConfig | None = None  # off when absent (balance.rebalance)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsConfig:
    handshake_s: float = 10.0  # the whole downstream request, from accept (slowloris guard)
    connect_s: float = 5.0  # TCP connect to one backend
    upstream_handshake_s: float = 10.0  # the backend's answer to the upgrade request
    idle_s: float = 600.0  # no byte relayed in either direction of an established session (keepalive does not count)
    reload_s: float = 30.0  # loading a config on SIGHUP (files included); beyond it the reload is abandoned


@dataclass(frozen=True, slots=True)
class RateConfig:
    rate_per_s: float  # tokens added per second ("20/s", "600/m")
    burst: int  # bucket size


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_header_bytes: int = 16384  # request line + header block of the downstream request
    max_message_bytes: int = 16 * 1024 * 1024  # one message across its fragments; 0 = unlimited
    max_connections: int | None = None  # whole process; beyond it 503 with Retry-After; 0 = no limit;
    # None (absent): derived from the fd limit at start (proto.limits.fd_budget)
    max_connections_per_ip: int = 0  # 429 beyond it; 0 = no limit
    handshake_rate_per_ip: RateConfig | None = None  # token bucket per client address; 429 + Retry-After
    max_message_rate: RateConfig | None = None  # per session and direction; close 1008 to the sender
    max_sessions_per_identity: int = 0  # per identity (auth, else the sticky key); 0 = no limit
    on_identity_limit: str = "refuse"  # one of IDENTITY_POLICIES: refuse (429 + Retry-After) | close_oldest (1008 to the oldest)


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownConfig:
    timeout_s: float = 30.0  # SIGTERM/SIGINT: sessions get this long to close, then the rest is cut
    spread_s: float = 10.0  # the 1001 closes are spread evenly over this


@dataclass(frozen=True, slots=True, kw_only=True)
class UpgradeConfig:
    timeout_s: float = 3600.0  # an upgrade's old workers keep their sessions this long, then close them with 1001


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    bind: Address | None = None  # "127.0.0.1:9090"...
    unix_path: str | None = None  # ...or "unix:/run/wsproxy/admin.sock"
    token_file: str | None = None  # bearer token required by every admin request when set
    token: bytes | None = field(default=None, repr=False)  # read from token_file at load time
    insecure_no_token: bool = False  # allows a non-loopback bind without token_file (logged at WARNING)
    health_needs_token: bool = False  # GET /healthz and /ready need the token too (probes then send it)
    ready_pools: tuple[str, ...] | None = None  # pools /ready needs a backend in; None = every pool a route names


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    format: str = "text"  # text | json
    level: str = "info"  # debug | info | warning | error
    sessions: str = "both"  # a session's info lines: both (open and close) | close (the close line alone) | none


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    source: str  # the file it was loaded from, for messages
    listeners: tuple[ListenerConfig, ...]  # at least one; names and binds unique
    routes: tuple[RouteConfig, ...]  # first match wins
    pools: dict[PoolName, PoolConfig] = field(hash=False)  # every route's pool is here
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    #: peers whose X-Forwarded-* / Forwarded headers are kept and appended to
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    shutdown: ShutdownConfig = ShutdownConfig()
    admin: AdminConfig | None = None  # the admin listener (metrics, status, drain); None = off
    log: LogConfig = LogConfig()
    #: worker processes: 1 = one process (no supervisor); N > 1 = a supervisor and N workers
    #: (``auto`` in the YAML: the CPUs this process may use, resolved when loaded)
    workers: int = 1
    upgrade: UpgradeConfig = UpgradeConfig()
