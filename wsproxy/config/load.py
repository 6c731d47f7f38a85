"""YAML text → a validated :class:`~wsproxy.config.schema.Config`, or every problem in it.

The file is composed into YAML nodes (``yaml.compose``), not loaded into plain
Python objects, so that every value still carries the line and column it came
from. A :class:`_Reader` walks those nodes section by section, checks each value
and records a :class:`~wsproxy.errors.ConfigError` for each problem instead of
stopping at the first one. If any were found, :func:`parse_config` raises them
all at once as :class:`~wsproxy.errors.ConfigErrors`, sorted by position::

    conf/wsproxy.yaml:14:9: pools.chat.backends[2].address: expected "host:port", got "chat-3"
    conf/wsproxy.yaml:21:11: routes[1].pool: route names pool "cht", which is not defined

Unknown keys are errors, not warnings: a misspelled ``timeouts.idel`` would
otherwise leave the default in force without anyone noticing.

This module reads one file and returns one ``Config``. Applying it (and
comparing it with the running one on SIGHUP) is ``control/reload.py``'s job.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import NamedTuple, TypeVar

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from wsproxy.config.durations import (
    DURATION_EXAMPLES,
    SIZE_EXAMPLES,
    is_host_name,
    parse_address,
    parse_duration,
    parse_size,
    quote,
)
from wsproxy.config.schema import (
    BALANCE_ALGORITHMS,
    Address,
    BackendConfig,
    Config,
    LimitsConfig,
    ListenerConfig,
    ListenerName,
    PoolConfig,
    PoolName,
    RouteConfig,
    TimeoutsConfig,
)
from wsproxy.errors import ConfigError, ConfigErrors

__all__ = ["load_config", "parse_address", "parse_config", "parse_duration", "parse_size"]

_T = TypeVar("_T")
_K = TypeVar("_K")

_NULL = "tag:yaml.org,2002:null"
_INT = "tag:yaml.org,2002:int"
_STR = "tag:yaml.org,2002:str"
_MERGE = "tag:yaml.org,2002:merge"

#: Listener and pool names: listener names become systemd FileDescriptorNames,
#: pool names appear in ``key=value`` log lines; neither may contain spaces or ":".
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_NAME_RULE = "of 1..255 characters A-Z a-z 0-9 _ . -"

_CONSTRUCTOR = SafeConstructor()  # only for YAML's integer syntax: 0x1F, 0o17, 1_000


def load_config(path: str) -> Config:
    """Read the YAML file at ``path`` and return its :class:`Config`.

    Raises :class:`ConfigErrors` for every problem in the file, or with a single
    error without position if the file cannot be read.
    """
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
        raise ConfigErrors([ConfigError(path, 0, 0, "", f"cannot read: {reason}")]) from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        message = f"cannot read: not UTF-8 (byte {byte:#04x} at offset {exc.start})"
        raise ConfigErrors([ConfigError(path, 0, 0, "", message)]) from None
    return parse_config(text, path)


def parse_config(text: str, filename: str) -> Config:
    """Parse and validate YAML ``text``; ``filename`` is only used in messages.

    Raises :class:`ConfigErrors` with every problem found, sorted by position.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigErrors([_syntax_error(filename, text, exc)]) from None
    reader = _Reader(filename)
    config = _config(reader, root)
    if config is None or reader.errors:
        raise ConfigErrors(sorted(reader.errors, key=lambda error: (error.line, error.column)))
    return config


# --- the sections, in the order of the schema ----------------------------------


def _config(r: _Reader, root: Node | None) -> Config | None:
    if root is None:
        what = "the file is empty: expected a mapping with listeners, routes and pools"
        r.errors.append(ConfigError(r.file, 1, 1, "", what))
        return None
    top = r.fields(
        _At(root, ""),
        required=("listeners", "routes", "pools"),
        optional=("timeouts", "limits"),
        what="a mapping with listeners, routes and pools",
    )
    if top is None:
        return None
    listeners = _listeners(r, top.get("listeners"))
    pools, pool_names = _pools(r, top.get("pools"))
    routes = _routes(r, top.get("routes"), pool_names)
    timeouts = _timeouts(r, top.get("timeouts"))
    limits = _limits(r, top.get("limits"))
    if r.errors:
        return None
    return Config(
        source=r.file,
        listeners=listeners,
        routes=routes,
        pools=pools,
        timeouts=timeouts,
        limits=limits,
    )


def _listeners(r: _Reader, at: _At | None) -> tuple[ListenerConfig, ...]:
    items = r.items(at, "listeners")
    if at is None or items is None:
        return ()
    if not items:
        r.error(at, "at least one listener is required")
    names: dict[str, Node] = {}
    binds: dict[Address, Node] = {}
    listeners = []
    for item in items:
        fields = r.fields(item, required=("name", "bind"), what="a listener (name, bind)")
        if fields is None:
            continue
        name = r.name(fields.get("name"), "a listener name")
        bind = r.address(fields.get("bind"), allow_port_zero=True)
        if name is not None:
            r.unique(names, name, fields["name"], "listener name")
        if bind is not None and bind.port != 0:  # each port-0 bind gets a port of its own
            r.unique(binds, bind, fields["bind"], "listener bind")
        if name is not None and bind is not None:
            listeners.append(ListenerConfig(name=ListenerName(name), bind=bind))
    return tuple(listeners)


def _routes(
    r: _Reader, at: _At | None, pool_names: Collection[str] | None
) -> tuple[RouteConfig, ...]:
    items = r.items(at, "routes")
    if at is None or items is None:
        return ()
    if not items:
        r.error(at, "at least one route is required")
    routes = []
    for item in items:
        fields = r.fields(
            item, required=("pool",), optional=("host", "path"), what="a route (host, path, pool)"
        )
        if fields is None:
            continue
        host = _route_host(r, fields.get("host"))
        path = _route_path(r, fields.get("path"))
        pool = r.text(fields.get("pool"), "a pool name")
        if pool is None:
            continue
        if pool_names is not None and pool not in pool_names:
            r.error(fields["pool"], f"route names pool {quote(pool)}, which is not defined")
        routes.append(RouteConfig(pool=PoolName(pool), **_given(host=host, path=path)))
    return tuple(routes)


def _route_host(r: _Reader, at: _At | None) -> str | None:
    """``"*"``, a host name, or ``"*."`` and a host name; lower case, as hosts compare."""
    host = r.text(at, 'a host name, "*" or "*.domain"')
    if at is None or host is None:
        return None
    if host == "*" or is_host_name(host.removeprefix("*.")):
        return host.lower()
    r.error(at, f'expected a host name, "*" or "*." and a host name, got {quote(host)}')
    return None


def _route_path(r: _Reader, at: _At | None) -> str | None:
    """A path prefix: it starts with "/" and has no query or fragment."""
    path = r.text(at, 'a path starting with "/"')
    if at is None or path is None:
        return None
    if not path.startswith("/"):
        r.error(at, f'expected a path starting with "/", got {quote(path)}')
    elif any(char in "?#" or char.isspace() for char in path):
        r.error(at, f'a route path cannot contain "?", "#" or whitespace, got {quote(path)}')
    else:
        return path
    return None


def _pools(r: _Reader, at: _At | None) -> tuple[dict[PoolName, PoolConfig], set[str] | None]:
    """The pools that are valid, and the names of all pools (``None`` if there is no
    mapping of pools at all, so that routes are not also reported as dangling)."""
    entries = r.entries(at, "a mapping of pool names to pools")
    if at is None or entries is None:
        return {}, None
    if not entries:
        r.error(at, "at least one pool is required")
    pools = {}
    for name_at, pool_at in entries.values():
        name = r.name(name_at, "a pool name")
        fields = r.fields(
            pool_at,
            required=("backends",),
            optional=("balance",),
            what="a pool (balance, backends)",
        )
        if fields is None:
            continue
        balance = r.choice(fields.get("balance"), BALANCE_ALGORITHMS, "balance algorithm")
        backends = _backends(r, fields.get("backends"))
        if name is not None:
            pool = PoolConfig(name=PoolName(name), backends=backends, **_given(balance=balance))
            pools[pool.name] = pool
    return pools, set(entries)


def _backends(r: _Reader, at: _At | None) -> tuple[BackendConfig, ...]:
    items = r.items(at, "backends")
    if at is None or items is None:
        return ()
    if not items:
        r.error(at, "a pool needs at least one backend")
    addresses: dict[Address, Node] = {}
    backends = []
    for item in items:
        fields = r.fields(
            item, required=("address",), optional=("weight",), what="a backend (address, weight)"
        )
        if fields is None:
            continue
        address = r.address(fields.get("address"), allow_port_zero=False)
        weight = r.integer(fields.get("weight"), 1, 1000)
        if address is not None:
            r.unique(addresses, address, fields["address"], "backend address")
            backends.append(BackendConfig(address=address, **_given(weight=weight)))
    return tuple(backends)


def _timeouts(r: _Reader, at: _At | None) -> TimeoutsConfig:
    fields = r.fields(
        at, optional=("handshake", "connect", "upstream_handshake", "idle"), null_is_empty=True
    )
    if fields is None:
        return TimeoutsConfig()
    return TimeoutsConfig(
        **_given(
            handshake_s=r.duration(fields.get("handshake")),
            connect_s=r.duration(fields.get("connect")),
            upstream_handshake_s=r.duration(fields.get("upstream_handshake")),
            idle_s=r.duration(fields.get("idle")),
        )
    )


def _limits(r: _Reader, at: _At | None) -> LimitsConfig:
    fields = r.fields(at, optional=("max_header_bytes", "max_message_bytes"), null_is_empty=True)
    if fields is None:
        return LimitsConfig()
    return LimitsConfig(
        **_given(
            max_header_bytes=r.size(fields.get("max_header_bytes"), minimum=1024),
            max_message_bytes=r.size(fields.get("max_message_bytes"), minimum=0),  # 0 = unlimited
        )
    )


def _given(**values: _T | None) -> dict[str, _T]:
    """The keyword arguments that have a value, so that dataclass defaults fill the rest."""
    return {key: value for key, value in values.items() if value is not None}


# --- the reader --------------------------------------------------------------


class _At(NamedTuple):
    """A node and its YAML path, such as ``pools.chat.backends[2].address``."""

    node: Node
    path: str


class _Reader:
    """Reads typed values out of YAML nodes, recording errors instead of raising them.

    Every reading method takes an :class:`_At`, or ``None`` for a key that is
    absent (and then returns ``None`` without complaint: ``fields`` has already
    reported it if it was required). When the node is wrong, the method records a
    :class:`ConfigError` at the node's position and returns ``None``. This lets
    the section builders above read like the schema and still find every error.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[ConfigError] = []
        # (key, key node, value node) by id() of a MappingNode; None while it is being expanded
        self._pairs_of: dict[int, list[tuple[str, Node, Node]] | None] = {}

    def error(self, at: _At, message: str) -> None:
        self.error_at(at.node, at.path, message)

    def error_at(self, node: Node, path: str, message: str) -> None:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1  # PyYAML counts from 0
        self.errors.append(ConfigError(self.file, line, column, path, message))

    # --- collections ---

    def fields(
        self,
        at: _At | None,
        *,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
        what: str = "a mapping",
        null_is_empty: bool = False,
    ) -> dict[str, _At] | None:
        """The known keys of a mapping with fixed keys; reports unknown and missing ones.

        ``null_is_empty`` accepts a key with nothing under it (``timeouts:`` with
        every line below commented out) as an empty mapping.
        """
        if at is None:
            return None
        if null_is_empty and at.node.tag == _NULL:
            return {}
        if not isinstance(at.node, MappingNode):
            self.error(at, f"expected {what}, got {_describe(at.node)}")
            return None
        known = required + optional
        found: dict[str, _At] = {}
        for key, key_node, value_node in self._pairs(at.node, at.path):
            if key in known:
                found[key] = _At(value_node, _join(at.path, key))
            else:
                message = f"unknown key {quote(key)} (expected one of: {', '.join(known)})"
                self.error_at(key_node, at.path, message)
        for key in required:
            if key not in found:
                self.error(at, f"missing required key {quote(key)}")
        return found

    def entries(self, at: _At | None, what: str) -> dict[str, tuple[_At, _At]] | None:
        """The entries of a mapping whose keys are names: ``name → (key, value)``."""
        if at is None:
            return None
        if not isinstance(at.node, MappingNode):
            self.error(at, f"expected {what}, got {_describe(at.node)}")
            return None
        entries = {}
        for key, key_node, value_node in self._pairs(at.node, at.path):
            path = _join(at.path, key)
            entries[key] = (_At(key_node, path), _At(value_node, path))
        return entries

    def items(self, at: _At | None, what: str) -> list[_At] | None:
        """The items of a list; ``what`` names them in the message if it is not a list."""
        if at is None:
            return None
        if not isinstance(at.node, SequenceNode):
            self.error(at, f"expected a list of {what}, got {_describe(at.node)}")
            return None
        return [_At(node, f"{at.path}[{index}]") for index, node in enumerate(at.node.value)]

    def unique(self, seen: dict[_K, Node], key: _K, at: _At, what: str) -> None:
        """Report ``key`` if an earlier node in ``seen`` had it already, else remember it."""
        if key in seen:
            line = seen[key].start_mark.line + 1
            self.error(at, f"duplicate {what} {quote(str(key))} (first at line {line})")
        else:
            seen[key] = at.node

    def _pairs(self, node: MappingNode, path: str) -> list[tuple[str, Node, Node]]:
        """``(key, key node, value node)`` for each entry of a mapping, in order.

        Reports duplicate keys, which ``yaml.compose`` keeps silently (and a plain
        load would resolve by keeping the last one). Expands YAML merge keys
        (``<<: *defaults``); keys written in the mapping win over merged ones, and
        earlier merged mappings over later ones. Each mapping is expanded once,
        however many aliases point at it.
        """
        cached = self._pairs_of.get(id(node))
        if cached is not None:
            return cached
        self._pairs_of[id(node)] = None
        own: dict[str, tuple[str, Node, Node]] = {}
        merged: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merged.extend(self._merge(value_node, path))
            elif not isinstance(key_node, ScalarNode) or key_node.tag == _NULL:
                self.error_at(key_node, path, f"expected a key name, got {_describe(key_node)}")
            elif key_node.value in own:
                first = own[key_node.value][1].start_mark.line + 1
                message = f"duplicate key {quote(key_node.value)} (first at line {first})"
                self.error_at(key_node, path, message)
            else:
                own[key_node.value] = (key_node.value, key_node, value_node)
        pairs = list(own.values())
        for pair in merged:
            if pair[0] not in own:
                own[pair[0]] = pair
                pairs.append(pair)
        self._pairs_of[id(node)] = pairs
        return pairs

    def _merge(self, node: Node, path: str) -> list[tuple[str, Node, Node]]:
        sources = node.value if isinstance(node, SequenceNode) else [node]
        pairs = []
        for source in sources:
            if not isinstance(source, MappingNode):
                self.error_at(source, path, f"expected a mapping to merge, got {_describe(source)}")
            elif id(source) in self._pairs_of and self._pairs_of[id(source)] is None:
                self.error_at(source, path, "a mapping cannot merge itself")
            else:
                pairs.extend(self._pairs(source, path))
        return pairs

    # --- scalars ---

    def text(self, at: _At | None, expected: str) -> str | None:
        """The text of any non-null scalar, as written: ``name: 8080`` is ``"8080"``."""
        if at is None:
            return None
        if isinstance(at.node, ScalarNode) and at.node.tag != _NULL:
            text: str = at.node.value
            return text
        self.error(at, f"expected {expected}, got {_describe(at.node)}")
        return None

    def name(self, at: _At | None, what: str) -> str | None:
        """A listener or pool name (see ``_NAME``)."""
        name = self.text(at, what)
        if at is None or name is None:
            return None
        if _NAME.fullmatch(name):
            return name
        self.error(at, f"expected {what} {_NAME_RULE}, got {quote(name)}")
        return None

    def choice(self, at: _At | None, allowed: Collection[str], what: str) -> str | None:
        listed = ", ".join(allowed)
        value = self.text(at, f"one of: {listed}")
        if at is None or value is None:
            return None
        if value in allowed:
            return value
        self.error(at, f"unknown {what} {quote(value)} (expected one of: {listed})")
        return None

    def integer(self, at: _At | None, low: int, high: int) -> int | None:
        """A YAML integer in ``low..high``; ``true`` and ``"5"`` are not integers."""
        if at is None:
            return None
        if isinstance(at.node, ScalarNode) and at.node.tag == _INT:
            number = _CONSTRUCTOR.construct_yaml_int(at.node)
            if low <= number <= high:
                return number
        self.error(at, f"expected an integer in {low}..{high}, got {_describe(at.node)}")
        return None

    def size(self, at: _At | None, minimum: int) -> int | None:
        """Bytes, as a YAML integer or a string with a binary unit ("64KiB")."""
        if at is None:
            return None
        if isinstance(at.node, ScalarNode) and at.node.tag == _INT:
            size = _CONSTRUCTOR.construct_yaml_int(at.node)
        elif isinstance(at.node, ScalarNode) and at.node.tag == _STR:
            try:
                size = parse_size(at.node.value)
            except ValueError as exc:
                self.error(at, str(exc))
                return None
        else:
            self.error(at, f"expected {SIZE_EXAMPLES}, got {_describe(at.node)}")
            return None
        if size < minimum:
            self.error(at, f"must be at least {minimum} bytes, got {_describe(at.node)}")
            return None
        return size

    def duration(self, at: _At | None) -> float | None:
        """Seconds, from a string with units ("1m30s"); must be more than zero."""
        text = self.text(at, DURATION_EXAMPLES)
        if at is None or text is None:
            return None
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            self.error(at, str(exc))
            return None
        if seconds <= 0:
            self.error(at, f"must be greater than 0, got {_describe(at.node)}")
            return None
        return seconds

    def address(self, at: _At | None, *, allow_port_zero: bool) -> Address | None:
        text = self.text(at, '"host:port"')
        if at is None or text is None:
            return None
        try:
            return parse_address(text, allow_port_zero=allow_port_zero)
        except ValueError as exc:
            self.error(at, str(exc))
            return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(node: Node) -> str:
    """What was seen, for "expected ..., got ..." messages: a list, "text", 10, null."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "null"
    value: str = node.value
    return quote(value) if node.tag == _STR else value


def _syntax_error(file: str, text: str, exc: yaml.YAMLError) -> ConfigError:
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
