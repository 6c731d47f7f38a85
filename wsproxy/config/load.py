"""YAML text → a validated :class:`~wsproxy.config.schema.Config`, or every problem in it.

The file is composed into YAML nodes (``yaml.compose``), not loaded into plain
Python objects, so that every value still carries the line and column it came
from. A :class:`Reader` walks those nodes section by section, checks each value
and records a :class:`~wsproxy.errors.ConfigError` for each problem instead of
stopping at the first one. If any were found, :func:`parse_config` raises them
all at once as :class:`~wsproxy.errors.ConfigErrors`, sorted by position::

    conf/wsproxy.yaml:14:9: pools.chat.backends[2].address: expected "host:port", got "chat-3"
    conf/wsproxy.yaml:21:11: routes[1].pool: route names pool "cht", which is not defined

Unknown keys are errors, not warnings: a misspelled ``timeouts.idel`` would
otherwise leave the default in force without anyone noticing.

This module reads one file (and its includes, through ``config.snapshot``'s
``ConfigTexts``: the disk, or a snapshot of an earlier load) and returns one
``Config``. Comparing it with the running one on SIGHUP is ``config/diff.py``'s (the plans), the SIGHUP flow
``control/reload.py``'s, and applying it ``app.App.reload``'s (the switch).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from wsproxy.config.durations import (
    is_host_name,
    parse_address,
    parse_duration,
    parse_size,
    quote,
)
from wsproxy.config import gate, ops
from wsproxy.config.compose import compose
from wsproxy.config.pools import pools
from wsproxy.config.reader import At, Reader, given
from wsproxy.config.schema import (
    IDENTITY_POLICIES,
    Address,
    AdminConfig,
    Config,
    LimitsConfig,
    ListenerConfig,
    ListenerName,
    PoolConfig,
    PoolName,
    RouteConfig,
    TimeoutsConfig,
)
from wsproxy.config.files import FileRefused
from wsproxy.config.snapshot import ConfigTexts
from wsproxy.errors import ConfigError, ConfigErrors
from wsproxy.proto.handshake import FORWARDING_HEADERS, Rejection
from wsproxy.proto.routing import host_matches, path_matches
from wsproxy.proto.target import normalise_path

__all__ = ["load_admin", "load_config", "parse_address", "parse_config", "parse_duration", "parse_size"]


def load_config(path: str, texts: ConfigTexts | None = None) -> Config:
    """Read the YAML file at ``path`` and return its :class:`Config`.

    The YAML files (``path`` and what it includes) are read from ``texts``
    (``config.snapshot``): by default the disk; a ``ConfigTexts()`` given
    records them (its ``snapshot()``), a ``ConfigTexts(snapshot)`` reads
    nothing from disk but the files the config references (certificates,
    token files...).

    Raises :class:`ConfigErrors` for every problem in the file, or with a single
    error without position if the file cannot be read.
    """
    texts = texts or ConfigTexts()
    return parse_config(_read_text(path, texts), path, texts)


def _read_text(path: str, texts: ConfigTexts) -> str:
    try:
        return texts.read(path)
    except FileRefused as exc:
        raise ConfigErrors([ConfigError(path, 0, 0, "", f"cannot read: {exc}")]) from None
    except OSError as exc:
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
        raise ConfigErrors([ConfigError(path, 0, 0, "", f"cannot read: {reason}")]) from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        message = f"cannot read: not UTF-8 (byte {byte:#04x} at offset {exc.start})"
        raise ConfigErrors([ConfigError(path, 0, 0, "", message)]) from None


def parse_config(text: str, filename: str, texts: ConfigTexts | None = None) -> Config:
    """Parse and validate YAML ``text``; ``filename`` is used in messages and to find includes (read from ``texts``).

    Raises :class:`ConfigErrors` with every problem found, sorted by position.
    """
    root, reader = _compose(text, filename, texts)
    config = _config(reader, root)
    if config is None or reader.errors:
        raise ConfigErrors(sorted_errors(reader.errors, filename), reader.partial)
    return config


def _compose(text: str, filename: str, texts: ConfigTexts | None = None) -> tuple[Node | None, Reader]:
    """The tree (includes merged, variables substituted) and a Reader holding the errors found so far."""
    try:
        root, composed = compose(text, filename, texts=texts)
    except yaml.YAMLError as exc:
        raise ConfigErrors([syntax_error(filename, text, exc)]) from None
    reader = Reader(filename)
    reader.errors.extend(composed.errors)
    reader.silenced = composed.failed
    return root, reader


def sorted_errors(errors: list[ConfigError], main: str) -> list[ConfigError]:
    """By position: the main file's errors first, then each included file's."""
    files = list(dict.fromkeys([main, *(error.file for error in errors)]))
    return sorted(errors, key=lambda error: (files.index(error.file), error.line, error.column))


def load_admin(path: str) -> AdminConfig | None:
    """Only the ``admin`` section of the config at ``path`` (includes and variables applied).

    For the operator commands (``wsproxy reload``, ``status``...), which must
    reach the running proxy even when the rest of the file has errors (that is
    what ``reload`` is there to report). Raises ConfigErrors for errors that
    stop the admin section from being read.
    """
    texts = ConfigTexts()
    root, reader = _compose(_read_text(path, texts), path, texts)
    admin = None
    if isinstance(root, MappingNode):
        for key, value in root.value:
            if isinstance(key, ScalarNode) and key.value == "admin":
                admin = ops.admin(reader, At(value, "admin"))
    errors = [error for error in reader.errors if error.path.startswith("admin")]
    if errors:
        raise ConfigErrors(errors)
    return admin


# --- the sections, in the order of the schema ----------------------------------


@dataclass(frozen=True, slots=True)
class Partial:
    """The listeners and pools read well from a config with errors (``ConfigErrors.partial``)."""

    source: str
    listeners: tuple[ListenerConfig, ...]
    pools: Mapping[PoolName, PoolConfig]


def _config(r: Reader, root: Node | None) -> Config | None:
    if root is None:
        what = "the file is empty: expected a mapping with listeners, routes and pools"
        r.errors.append(ConfigError(r.file, 1, 1, "", what))
        return None
    top = r.fields(
        At(root, ""),
        required=("listeners", "routes", "pools"),
        optional=("timeouts", "limits", "trusted_proxies", "shutdown", "admin", "log", "workers", "upgrade"),
        what="a mapping with listeners, routes and pools",
    )
    if top is None:
        return None
    listeners = _listeners(r, top.get("listeners"))
    pool_map, pool_names = pools(r, top.get("pools"))
    routes = _routes(r, top.get("routes"), pool_names)
    timeouts = _timeouts(r, top.get("timeouts"))
    limits = _limits(r, top.get("limits"))
    trusted = gate.trusted_proxies(r, top.get("trusted_proxies"))
    shutdown = ops.shutdown(r, top.get("shutdown"))
    admin = ops.admin(r, top.get("admin"), pool_names)
    if admin is not None and admin.bind is not None and admin.bind.port != 0:
        bind_node = next(v for k, v in top["admin"].node.value if isinstance(k, ScalarNode) and k.value == "bind")
        check_overlaps(r, [*r.bound, (admin.bind, At(bind_node, "admin.bind"))], start=len(r.bound), identical=True)
    log = ops.log(r, top.get("log"))
    workers = ops.workers(r, top.get("workers"))
    upgrade = ops.upgrade(r, top.get("upgrade"))
    if r.errors:
        r.partial = Partial(r.file, listeners, pool_map)  # their TLS files are still checked (edge.contexts)
        return None
    return Config(
        source=r.file,
        listeners=listeners,
        routes=routes,
        pools=pool_map,
        timeouts=timeouts,
        limits=limits,
        admin=admin,
        **given(trusted_proxies=trusted, shutdown=shutdown, log=log, workers=workers, upgrade=upgrade),
    )


def _listeners(r: Reader, at: At | None) -> tuple[ListenerConfig, ...]:
    items = r.items(at, "listeners")
    if at is None or items is None:
        return ()
    if not items:
        r.error(at, "at least one listener is required")
    names: dict[str, Node] = {}
    binds: dict[Address, Node] = {}
    bound: list[tuple[Address, At]] = []
    listeners = []
    for item in items:
        fields = r.fields(
            item,
            required=("name", "bind"),
            optional=("tls", "proxy_protocol"),
            what="a listener (name, bind, tls, proxy_protocol)",
        )
        if fields is None:
            continue
        name = r.name(fields.get("name"), "a listener name")
        bind = r.address(fields.get("bind"), allow_port_zero=True)
        tls = gate.listener_tls(r, fields.get("tls"))
        proxy_protocol = r.choice(fields.get("proxy_protocol"), ("v1", "v2", "off"), "proxy_protocol")
        if name is not None:
            r.unique(names, name, fields["name"], "listener name")
        if bind is not None and bind.port != 0:  # each port-0 bind gets a port of its own
            r.unique(binds, bind, fields["bind"], "listener bind")
        if name is not None and bind is not None:
            listeners.append(
                ListenerConfig(name=ListenerName(name), bind=bind, tls=tls, **given(proxy_protocol=proxy_protocol))
            )
            bound.append((bind, fields["bind"]))
    check_overlaps(r, bound)
    r.bound = bound  # the admin bind is checked against them too
    return tuple(listeners)


def check_overlaps(r: Reader, bound: list[tuple[Address, At]], start: int = 1, identical: bool = False) -> None:
    """Report each bind that would fail because an earlier one holds its port.

    ``0.0.0.0:P`` takes port P on every IPv4 address, ``[::]:P`` on every IPv6
    one (wsproxy binds IPv6 sockets IPV6_V6ONLY, so the two coexist), so
    ``127.0.0.1:P`` after ``0.0.0.0:P`` fails with EADDRINUSE at start.
    Identical listener binds are reported as duplicates already (``identical``
    checks them too, for the admin bind); DNS names other than ``localhost``
    are not resolved here. Only the binds from ``start`` on are checked.
    """
    for index in range(start, len(bound)):
        bind, at = bound[index]
        for earlier, earlier_at in bound[:index]:
            if bind.port == earlier.port and (bind != earlier or identical) and _overlap(bind.host, earlier.host):
                r.error(
                    at,
                    f"{bind} overlaps {earlier} ({earlier_at.path}, {r.where(earlier_at.node, at.node)}):"
                    " both hold the same port on the same address, so one cannot be bound",
                )
                break


def _ips(host: str) -> set[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address]] | None:
    if host.lower() == "localhost":
        return {(4, ipaddress.ip_address("127.0.0.1")), (6, ipaddress.ip_address("::1"))}
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return {(ip.version, ip)}


def _overlap(a: str, b: str) -> bool:
    first, second = _ips(a), _ips(b)
    if first is None or second is None:
        return False
    return any(
        fa == fb and (x == y or x.is_unspecified or y.is_unspecified) for fa, x in first for fb, y in second
    )


def _routes(
    r: Reader, at: At | None, pool_names: Collection[str] | None
) -> tuple[RouteConfig, ...]:
    items = r.items(at, "routes")
    if at is None or items is None:
        return ()
    if not items:
        r.error(at, "at least one route is required")
    routes = []
    placed: list[tuple[RouteConfig, At]] = []
    for item in items:
        fields = r.fields(
            item,
            required=("pool",),
            optional=(
                "host",
                "path",
                "origins",
                "allow_missing_origin",
                "auth",
                "keepalive",
                "validate_utf8",
                "backend_failure_close_code",
                "path_ignore_case",
                "strip_headers",
                "strip_headers_default",
                "subprotocols",
                "subprotocol_required",
                "subprotocol",
                "client_cert_header",
                "max_session_age",
            ),
            what="a route (host, path, pool, origins, allow_missing_origin, auth, keepalive, "
            "validate_utf8, backend_failure_close_code, path_ignore_case, strip_headers, strip_headers_default, "
            "subprotocols, subprotocol_required, subprotocol, client_cert_header, max_session_age)",
        )
        if fields is None:
            continue
        host = _route_host(r, fields.get("host"))
        path = _route_path(r, fields.get("path"))
        origins = gate.origins(r, fields.get("origins"))
        allow_missing = r.boolean(fields.get("allow_missing_origin"))
        auth = gate.auth(r, fields.get("auth"))
        keepalive = ops.keepalive(r, fields.get("keepalive"))
        validate_utf8 = r.boolean(fields.get("validate_utf8"))
        failure_code = _backend_failure_code(r, fields.get("backend_failure_close_code"))
        path_ignore_case = r.boolean(fields.get("path_ignore_case"))
        strip_headers = _strip_headers(r, fields.get("strip_headers"))
        strip_headers_default = r.boolean(fields.get("strip_headers_default"))
        subprotocols = _subprotocols(r, fields.get("subprotocols"))
        subprotocol_required = r.boolean(fields.get("subprotocol_required"))
        subprotocol = _subprotocol(r, fields.get("subprotocol"))
        if subprotocol is not None and subprotocols is not None and subprotocol not in subprotocols:
            r.error(fields["subprotocol"], f"the route matches on subprotocol {quote(subprotocol)}, which its subprotocols list does not allow")
        client_cert_header = _client_cert_header(r, fields.get("client_cert_header"))
        max_session_age = r.duration(fields.get("max_session_age"))  # proto.lifetime: ±10 %, then 1012
        pool = r.text(fields.get("pool"), "a pool name")
        if pool is None:
            continue
        if pool_names is not None and pool not in pool_names:
            r.error(fields["pool"], f"route names pool {quote(pool)}, which is not defined")
        route = (
            RouteConfig(
                pool=PoolName(pool),
                origins=origins,
                auth=auth,
                keepalive=keepalive,
                subprotocols=subprotocols,
                subprotocol=subprotocol,
                client_cert_header=client_cert_header,
                **given(
                    host=host,
                    subprotocol_required=subprotocol_required,
                    path=path,
                    allow_missing_origin=allow_missing,
                    validate_utf8=validate_utf8,
                    backend_failure_close_code=failure_code,
                    path_ignore_case=path_ignore_case,
                    strip_headers=strip_headers,
                    strip_headers_default=strip_headers_default,
                    max_session_age_s=max_session_age,
                ),
            )
        )
        _check_shadowed(r, route, item, placed)
        placed.append((route, item))
        routes.append(route)
    return tuple(routes)


def _check_shadowed(r: Reader, route: RouteConfig, at: At, earlier: list[tuple[RouteConfig, At]]) -> None:
    """A route that an earlier one covers entirely never matches (first match wins): an error.

    Covers: the earlier host pattern matches every host this one does, the
    earlier path prefix every path, and the earlier route matches on no
    subprotocol or on the one this route matches on (``proto.routing``'s rules).
    """
    for before, before_at in earlier:
        if (
            host_pattern_covers(before.host, route.host)
            and path_matches(before.path, route.path)
            and (before.subprotocol is None or before.subprotocol == route.subprotocol)
        ):
            matching = f", subprotocol {quote(before.subprotocol)}" if before.subprotocol is not None else ""
            r.error(
                at,
                f"this route never matches: {before_at.path} ({r.where(before_at.node, at.node)}, host"
                f" {quote(before.host)}, path {quote(before.path)}{matching}) comes first and takes every request it would;"
                " put the narrower route first",
            )
            return


def host_pattern_covers(pattern: str, other: str) -> bool:
    """Does route host ``pattern`` match every host that ``other`` matches?"""
    if pattern == "*":
        return True
    if other == "*":
        return False
    if other.startswith("*."):
        return pattern.startswith("*.") and other[1:].endswith(pattern[1:])
    return host_matches(pattern, other)


#: What a client may be told when its backend fails: 1014 "Bad Gateway" (RFC 6455 registry)
#: or 1011 "Internal Error", for clients that refuse 1014 (wsproto before 1.3, Autobahn).
BACKEND_FAILURE_CODES = (1014, 1011)


def _backend_failure_code(r: Reader, at: At | None) -> int | None:
    code = r.integer(at, 1000, 4999)
    if at is None or code is None:
        return None
    if code not in BACKEND_FAILURE_CODES:
        r.error(at, f"expected 1014 or 1011, got {code}")
        return None
    return code


def _route_host(r: Reader, at: At | None) -> str | None:
    """``"*"``, a host name, or ``"*."`` and a host name; lower case, as hosts compare."""
    host = r.text(at, 'a host name, "*" or "*.domain"')
    if at is None or host is None:
        return None
    if host == "*" or is_host_name(host.removeprefix("*.")):
        return host.lower()
    r.error(at, f'expected a host name, "*" or "*." and a host name, got {quote(host)}')
    return None


def _route_path(r: Reader, at: At | None) -> str | None:
    """A path prefix: it starts with "/" and has no query or fragment."""
    path = r.text(at, 'a path starting with "/"')
    if at is None or path is None:
        return None
    if not path.startswith("/"):
        r.error(at, f'expected a path starting with "/", got {quote(path)}')
    elif any(char in "?#" or char.isspace() for char in path):
        r.error(at, f'a route path cannot contain "?", "#" or whitespace, got {quote(path)}')
    else:
        # Requests are matched in normal form (proto.target), so a prefix in another form never matches.
        normal = normalise_path(path.encode("utf-8"))
        if isinstance(normal, Rejection):
            r.error(at, f"{normal.reason.replace('request path', 'a route path')}, got {quote(path)}")
        elif normal != path.encode("utf-8"):
            r.error(at, f"a route path is matched in normal form: write {quote(normal.decode('ascii'))}, not {quote(path)}")
        else:
            return path
    return None


#: Headers a route cannot strip: the handshake needs them, or the proxy always rewrites them.
_UNSTRIPPABLE = ("host", "upgrade", "connection", "sec-websocket-")


def _strip_headers(r: Reader, at: At | None) -> tuple[str, ...] | None:
    """``strip_headers``: header names (RFC 9110 §5.1 tokens) the route never passes upstream."""
    names = r.strings(at, "header names")
    if at is None or names is None:
        return None
    for index, name in enumerate(names):
        item = At(at.node.value[index], f"{at.path}[{index}]")
        canonical = name.lower().replace("_", "-")
        if not _HEADER_NAME.fullmatch(name):
            r.error(item, f"expected a header name, got {quote(name)}")
        elif canonical.startswith(_UNSTRIPPABLE):
            r.error(item, f"{name} cannot be stripped: the WebSocket handshake needs it")
        elif canonical.encode("latin-1") in FORWARDING_HEADERS:
            r.error(item, f"{name} is always replaced by the proxy (or appended to, for trusted_proxies)")
    return names


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _subprotocol(r: Reader, at: At | None) -> str | None:
    """A subprotocol name: an RFC 7230 token (RFC 6455 §4.1, Sec-WebSocket-Protocol)."""
    name = r.text(at, "a subprotocol name")
    if at is None or name is None:
        return None
    if not _HEADER_NAME.fullmatch(name):
        r.error(at, f"a subprotocol name is a token (letters, digits and !#$%&'*+-.^_`|~), got {quote(name)}")
        return None
    return name


def _subprotocols(r: Reader, at: At | None) -> tuple[str, ...] | None:
    names = r.strings(at, "subprotocol names")
    if at is None or names is None:
        return None
    for index, name in enumerate(names):
        _subprotocol(r, At(at.node.value[index], f"{at.path}[{index}]"))
    return names  # [] is a policy too: only requests that offer no subprotocol


def _client_cert_header(r: Reader, at: At | None) -> str | None:
    """The header that carries the client certificate upstream (Envoy's XFCC format)."""
    name = r.text(at, "a header name")
    if at is None or name is None:
        return None
    canonical = name.lower().replace("_", "-")
    if not _HEADER_NAME.fullmatch(name):
        r.error(at, f"expected a header name, got {quote(name)}")
    elif canonical.startswith(_UNSTRIPPABLE) or canonical.encode("latin-1") in FORWARDING_HEADERS:
        r.error(at, f"{name} is a header the proxy or the handshake owns")
    else:
        return name
    return None


def _timeouts(r: Reader, at: At | None) -> TimeoutsConfig:
    fields = r.fields(
        at, optional=("handshake", "connect", "upstream_handshake", "idle", "reload"), null_is_empty=True
    )
    if fields is None:
        return TimeoutsConfig()
    return TimeoutsConfig(
        **given(
            handshake_s=r.duration(fields.get("handshake")),
            connect_s=r.duration(fields.get("connect")),
            upstream_handshake_s=r.duration(fields.get("upstream_handshake")),
            idle_s=r.duration(fields.get("idle")),
            reload_s=r.duration(fields.get("reload")),
        )
    )


def _limits(r: Reader, at: At | None) -> LimitsConfig:
    fields = r.fields(
        at,
        optional=(
            "max_header_bytes",
            "max_message_bytes",
            "max_connections",
            "max_connections_per_ip",
            "handshake_rate_per_ip",
            "max_message_rate",
            "max_sessions_per_identity",
            "on_identity_limit",
        ),
        null_is_empty=True,
    )
    if fields is None:
        return LimitsConfig()
    return LimitsConfig(
        handshake_rate_per_ip=gate.rate(r, fields.get("handshake_rate_per_ip")),
        max_message_rate=gate.rate(r, fields.get("max_message_rate")),
        **given(
            max_header_bytes=r.size(fields.get("max_header_bytes"), minimum=1024),
            max_message_bytes=r.size(fields.get("max_message_bytes"), minimum=0),  # 0 = unlimited
            max_connections=r.integer(fields.get("max_connections"), 0, 10_000_000),
            max_connections_per_ip=r.integer(fields.get("max_connections_per_ip"), 0, 10_000_000),
            max_sessions_per_identity=r.integer(fields.get("max_sessions_per_identity"), 0, 10_000_000),
            on_identity_limit=r.choice(fields.get("on_identity_limit"), IDENTITY_POLICIES, "on_identity_limit"),
        ),
    )


def syntax_error(file: str, text: str, exc: yaml.YAMLError) -> ConfigError:
    """A ConfigError at the position PyYAML gives for a syntax error."""
    if isinstance(exc, yaml.MarkedYAMLError):
        line, column = _position(exc.problem_mark or exc.context_mark)
        context_at = _position(exc.context_mark)
        message = f"invalid YAML: {exc.problem or exc.context}"
        if exc.problem == "but found another document":  # the composer's phrasing
            message = "invalid YAML: a config file holds one document, found a second"
        elif exc.problem and exc.context and context_at not in ((0, 0), (line, column)):
            message += f" ({exc.context} at line {context_at[0]}, column {context_at[1]})"
        if exc.context == "while scanning an alias":
            message += '; a value that starts with "*" must be quoted, like "*.example.com"'
        return ConfigError(file, line, column, "", message)
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML forbids, such as NUL
        position: int = exc.position
        line = text.count("\n", 0, position) + 1
        column = position - text.rfind("\n", 0, position)
        message = f"invalid YAML: character {int(exc.character):#06x} is not allowed"
        return ConfigError(file, line, column, "", message)
    return ConfigError(file, 0, 0, "", f"invalid YAML: {exc}")


def _position(mark: yaml.Mark | None) -> tuple[int, int]:
    """Line and column counting from 1, or (0, 0) without a mark."""
    return (mark.line + 1, mark.column + 1) if mark else (0, 0)
