"""Reading typed values out of YAML nodes, with positions, collecting errors.

``Reader`` is the tool the config sections (``load.py``, ``pools.py``) are
written with: each of its methods takes an ``At`` (a node and its YAML path)
or ``None`` for an absent key, returns the value or ``None``, and records a
``ConfigError`` at the node's position instead of raising. No section logic
here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from typing import Any, NamedTuple, TypeVar

from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from wsproxy.config.durations import (
    DURATION_EXAMPLES,
    SIZE_EXAMPLES,
    parse_address,
    parse_duration,
    parse_size,
    quote,
)
from wsproxy.config.files import MAX_FILE_BYTES, FileRefused, check_file, read_file
from wsproxy.config.schema import Address, Position
from wsproxy.errors import ConfigError

_T = TypeVar("_T")
_K = TypeVar("_K")

_NULL = "tag:yaml.org,2002:null"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_STR = "tag:yaml.org,2002:str"
_BOOL = "tag:yaml.org,2002:bool"
_MERGE = "tag:yaml.org,2002:merge"

#: Listener and pool names: listener names become systemd FileDescriptorNames,
#: pool names appear in ``key=value`` log lines; neither may contain spaces or ":".
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,255}")
_NAME_RULE = "of 1..255 characters A-Z a-z 0-9 _ . -"

_CONSTRUCTOR = SafeConstructor()  # only for YAML's integer syntax: 0x1F, 0o17, 1_000


class At(NamedTuple):
    """A node and its YAML path, such as ``pools.chat.backends[2].address``."""

    node: Node
    path: str


class Reader:
    """Reads typed values out of YAML nodes, recording errors instead of raising them.

    Every reading method takes an :class:`At`, or ``None`` for a key that is
    absent (and then returns ``None`` without complaint: ``fields`` has already
    reported it if it was required). When the node is wrong, the method records a
    :class:`ConfigError` at the node's position and returns ``None``. This lets
    the section builders above read like the schema and still find every error.
    """

    def __init__(self, file: str) -> None:
        self.file = file
        self.errors: list[ConfigError] = []
        self.bound: list[tuple[Address, At]] = []  # the listeners' binds, for checks across sections
        self.silenced: set[int] = set()  # id() of nodes already reported (an unset ${VAR}): no second error
        self.partial: object = None  # what the loader could read of a config with errors (load.Partial)
        # (key, key node, value node) by id() of a MappingNode; None while it is being expanded
        self._pairs_of: dict[int, list[tuple[str, Node, Node]] | None] = {}

    def error(self, at: At, message: str) -> None:
        self.error_at(at.node, at.path, message)

    def error_at(self, node: Node, path: str, message: str) -> None:
        if id(node) in self.silenced:
            return
        line, column = node.start_mark.line + 1, node.start_mark.column + 1  # PyYAML counts from 0
        self.errors.append(ConfigError(self.file_of(node), line, column, path, message))

    def position(self, at: At) -> Position:
        """Where ``at`` is, kept in the config for errors found after loading (``edge.contexts``)."""
        node = at.node
        return Position(self.file_of(node), node.start_mark.line + 1, node.start_mark.column + 1, at.path)

    def file_of(self, node: Node) -> str:
        """The file ``node`` came from (``config.compose`` names every node's marks), else this Reader's."""
        name: str = node.start_mark.name
        return self.file if name.startswith("<") else name

    def where(self, node: Node, other: Node) -> str:
        """``line N`` of ``node``, or ``FILE:N`` when it is in another file than ``other``."""
        line = node.start_mark.line + 1
        file = self.file_of(node)
        return f"line {line}" if file == self.file_of(other) else f"{file}:{line}"

    # --- collections ---

    def fields(
        self,
        at: At | None,
        *,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
        what: str = "a mapping",
        null_is_empty: bool = False,
    ) -> dict[str, At] | None:
        """The known keys of a mapping with fixed keys; reports unknown and missing ones.

        ``null_is_empty`` accepts a key with nothing under it (``timeouts:`` with
        every line below commented out) as an empty mapping.
        """
        if at is None:
            return None
        if null_is_empty and at.node.tag == _NULL:
            return {}
        if not isinstance(at.node, MappingNode):
            self.error(at, f"expected {what}, got {describe(at.node)}")
            return None
        known = required + optional
        found: dict[str, At] = {}
        for key, key_node, value_node in self._pairs(at.node, at.path):
            if key in known:
                found[key] = At(value_node, join(at.path, key))
            else:
                message = f"unknown key {quote(key)} (expected one of: {', '.join(known)})"
                self.error_at(key_node, at.path, message)
        for key in required:
            if key not in found:
                self.error(at, f"missing required key {quote(key)}")
        return found

    def entries(self, at: At | None, what: str) -> dict[str, tuple[At, At]] | None:
        """The entries of a mapping whose keys are names: ``name → (key, value)``."""
        if at is None:
            return None
        if not isinstance(at.node, MappingNode):
            self.error(at, f"expected {what}, got {describe(at.node)}")
            return None
        entries = {}
        for key, key_node, value_node in self._pairs(at.node, at.path):
            path = join(at.path, key)
            entries[key] = (At(key_node, path), At(value_node, path))
        return entries

    def items(self, at: At | None, what: str) -> list[At] | None:
        """The items of a list; ``what`` names them in the message if it is not a list."""
        if at is None:
            return None
        if not isinstance(at.node, SequenceNode):
            self.error(at, f"expected a list of {what}, got {describe(at.node)}")
            return None
        return [At(node, f"{at.path}[{index}]") for index, node in enumerate(at.node.value)]

    def unique(self, seen: dict[_K, Node], key: _K, at: At, what: str) -> None:
        """Report ``key`` if an earlier node in ``seen`` had it already, else remember it."""
        if key in seen:
            self.error(at, f"duplicate {what} {quote(str(key))} (first at {self.where(seen[key], at.node)})")
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
                self.error_at(key_node, path, f"expected a key name, got {describe(key_node)}")
            elif key_node.value in own:
                first = self.where(own[key_node.value][1], key_node)
                message = f"duplicate key {quote(key_node.value)} (first at {first})"
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
                self.error_at(source, path, f"expected a mapping to merge, got {describe(source)}")
            elif id(source) in self._pairs_of and self._pairs_of[id(source)] is None:
                self.error_at(source, path, "a mapping cannot merge itself")
            else:
                pairs.extend(self._pairs(source, path))
        return pairs

    # --- scalars ---

    def text(self, at: At | None, expected: str) -> str | None:
        """The text of any non-null scalar, as written: ``name: 8080`` is ``"8080"``."""
        if at is None:
            return None
        if isinstance(at.node, ScalarNode) and at.node.tag != _NULL:
            text: str = at.node.value
            return text
        self.error(at, f"expected {expected}, got {describe(at.node)}")
        return None

    def name(self, at: At | None, what: str) -> str | None:
        """A listener or pool name (see ``_NAME``)."""
        name = self.text(at, what)
        if at is None or name is None:
            return None
        if _NAME.fullmatch(name):
            return name
        self.error(at, f"expected {what} {_NAME_RULE}, got {quote(name)}")
        return None

    def choice(self, at: At | None, allowed: Collection[str], what: str) -> str | None:
        listed = ", ".join(allowed)
        value = self.text(at, f"one of: {listed}")
        if at is None or value is None:
            return None
        if value in allowed:
            return value
        self.error(at, f"unknown {what} {quote(value)} (expected one of: {listed})")
        return None

    def integer(self, at: At | None, low: int, high: int) -> int | None:
        """A YAML integer in ``low..high``; ``true`` and ``"5"`` are not integers."""
        if at is None:
            return None
        if isinstance(at.node, ScalarNode) and at.node.tag == _INT:
            number = _CONSTRUCTOR.construct_yaml_int(at.node)
            if low <= number <= high:
                return number
        self.error(at, f"expected an integer in {low}..{high}, got {describe(at.node)}")
        return None

    def number(self, at: At | None, low: float, high: float, expected: str) -> float | None:
        """A YAML number (integer or decimal) with ``low < number <= high``; ``"1.5"`` and ``true`` are not numbers."""
        if at is None:
            return None
        if isinstance(at.node, ScalarNode) and at.node.tag in (_INT, _FLOAT):
            try:
                number = float(at.node.value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and low < number <= high:
                return number
        self.error(at, f"expected {expected}, got {describe(at.node)}")
        return None

    def size(self, at: At | None, minimum: int) -> int | None:
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
            self.error(at, f"expected {SIZE_EXAMPLES}, got {describe(at.node)}")
            return None
        if size < minimum:
            self.error(at, f"must be at least {minimum} bytes, got {describe(at.node)}")
            return None
        return size

    def duration(self, at: At | None) -> float | None:
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
            self.error(at, f"must be greater than 0, got {describe(at.node)}")
            return None
        return seconds

    def filepath(self, at: At | None, what: str = "a file name") -> str | None:
        """A file name, made absolute: a relative one is relative to the config file."""
        text = self.text(at, what)
        if text is None:
            return None
        if os.path.isabs(text):
            return text
        assert at is not None
        return os.path.join(os.path.dirname(os.path.abspath(self.file_of(at.node))), text)

    def read(self, at: At | None, what: str = "a file name", max_bytes: int = MAX_FILE_BYTES) -> tuple[str, bytes] | None:
        """A file named at ``at``, read whole: (absolute path, content); errors say why not.

        Only a regular file of at most ``max_bytes`` is read (``config.files``):
        a FIFO, a device or a directory is an error at the key, never a hang.
        """
        path = self.filepath(at, what)
        if at is None or path is None:
            return None
        try:
            return path, read_file(path, max_bytes)
        except FileRefused as exc:
            self.error(at, str(exc))
        except OSError as exc:
            self.error(at, f"cannot read {path}: {exc.strerror or exc}")
        return None

    def tls_file(self, at: At | None, max_bytes: int = MAX_FILE_BYTES) -> str | None:
        """A certificate, key or CA file that ``ssl`` will read by path: checked, not read.

        ``ssl.SSLContext.load_cert_chain`` and ``load_verify_locations`` open
        the file themselves, so checking its type and size first is what can be
        done (a file swapped in between is left to the reload deadline). A
        missing or unreadable file is an error at its own key, so that every
        one is reported at once (the TLS loader would stop at the first).
        """
        path = self.filepath(at)
        if at is None or path is None:
            return None
        try:
            check_file(path, max_bytes)
        except FileRefused as exc:
            self.error(at, str(exc))
            return None
        if not os.path.exists(path):
            self.error(at, f"cannot read {path}: No such file or directory")
            return None
        if not os.access(path, os.R_OK):
            self.error(at, f"cannot read {path}: Permission denied")
            return None
        return path

    def strings(self, at: At | None, what: str) -> tuple[str, ...] | None:
        """A list of strings."""
        items = self.items(at, what)
        if items is None:
            return None
        values = [self.text(item, what) for item in items]
        if any(value is None for value in values):
            return None
        return tuple(value for value in values if value is not None)

    def duration_or_zero(self, at: At | None) -> float | None:
        """Seconds, where "0" (or "0s") is allowed and means "at once"."""
        if at is not None and isinstance(at.node, ScalarNode) and at.node.value in ("0", "0s", "0ms"):
            return 0.0
        return self.duration(at)

    def address(self, at: At | None, *, allow_port_zero: bool) -> Address | None:
        text = self.text(at, '"host:port"')
        if at is None or text is None:
            return None
        try:
            return parse_address(text, allow_port_zero=allow_port_zero)
        except ValueError as exc:
            self.error(at, str(exc))
            return None

    def boolean(self, at: At | None) -> bool | None:
        """``true`` or ``false``."""
        if at is None:
            return None
        if isinstance(at.node, ScalarNode) and at.node.tag == _BOOL:
            return bool(_CONSTRUCTOR.construct_yaml_bool(at.node))
        self.error(at, f"expected true or false, got {describe(at.node)}")
        return None

    def integers(self, at: At | None, low: int, high: int) -> tuple[int, ...] | None:
        """A list of integers in ``low..high``."""
        items = self.items(at, f"integers in {low}..{high}")
        if items is None:
            return None
        values = [self.integer(item, low, high) for item in items]
        if any(value is None for value in values):
            return None
        return tuple(value for value in values if value is not None)


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def describe(node: Node) -> str:
    """What was seen, for "expected ..., got ..." messages: a list, "text", 10, null."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "null"
    value: str = node.value
    return quote(value) if node.tag == _STR else value


def given(**values: Any) -> dict[str, Any]:
    """The keyword arguments that have a value, so that dataclass defaults fill the rest."""
    return {key: value for key, value in values.items() if value is not None}
