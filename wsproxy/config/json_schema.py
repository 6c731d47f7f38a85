"""The config's JSON Schema (draft 2020-12), generated from the loader itself: ``wsproxy schema``.

Nothing here is a second description of the config to keep in step by hand.
The schema is read off the loader's source (``load.py``, ``pools.py``,
``gate.py``, ``ops.py``): every ``r.fields(at, required=..., optional=...)``
call is a mapping with exactly those keys, and what the loader does with a
key's value gives the key its schema:

- ``r.integer(v, 1, 100)`` → an integer in 1..100, ``r.boolean`` → a boolean,
  ``r.choice(v, ("a", "b"))`` (or a tuple constant such as
  ``BALANCE_ALGORITHMS``) → an enum, ``r.duration``, ``r.text``, ``r.address``,
  a file → a string, ``r.size`` → an integer or a string (``"64KiB"``),
  ``r.strings`` / ``r.integers`` → a list;
- a key handed to another loader function (``_health(r, fields.get("health"))``)
  → that function's mapping, list (``r.items``) or named mapping (``r.entries``).

Descriptions come from the field comments of ``schema.py``'s dataclasses
where a key has the field's name (``interval`` for ``interval_s``) and only
one dataclass has a field of that name. A value
written as ``${VAR}`` is substituted before the loader types it, so an editor
using this schema flags ``port: ${PORT}``; ``wsproxy check`` does not.

What this module is not: a validator (the loader is; jsonschema is used by the
tests only) or a description of semantic rules (a route's pool must exist,
binds must not overlap): those stay in the loader and ``wsproxy check``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import tokenize
from pathlib import Path
from typing import Any

from . import schema as schema_module

#: The loader modules read for key tables, and the function each reads the top of the file with.
LOADER_MODULES = ("load", "pools", "gate", "ops")
ROOT_FUNCTION = ("load", "_config")
#: Keys read before the loader sees the file (config/compose.py): they are not in its tables.
COMPOSE_KEYS: dict[str, Any] = {
    "include": {
        "type": "array",
        "items": {"type": "string"},
        "description": "more YAML files merged into this one (globs relative to this file)",
    }
}
DURATION = {"type": "string", "description": 'a duration: "250ms", "10s", "1m30s", "1h"'}
SCALARS: dict[str, dict[str, Any]] = {
    "text": {"type": "string"},
    "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$"},
    "address": {"type": "string", "description": '"host:port", IPv6 in brackets: "[::1]:9000"'},
    "duration": DURATION,
    "duration_or_zero": {"type": ["string", "integer"], "description": 'a duration, or 0: "0s", "2s"'},
    "size": {"type": ["integer", "string"], "description": 'bytes: 65536 or "64KiB", "16MiB"'},
    "boolean": {"type": "boolean"},
    "filepath": {"type": "string", "description": "a file name (relative to the config file)"},
    "read": {"type": "string", "description": "a file name (relative to the config file)"},
    "tls_file": {"type": "string", "description": "a PEM file (relative to the config file)"},
    "strings": {"type": "array", "items": {"type": "string"}},
}


@dataclasses.dataclass
class _Function:
    module: str
    node: ast.FunctionDef
    params: list[str]


class _Generator:
    def __init__(self) -> None:
        self.modules = {name: importlib.import_module(f"{__package__}.{name}") for name in LOADER_MODULES}
        self.trees = {name: ast.parse(Path(mod.__file__ or "").read_text()) for name, mod in self.modules.items()}
        self.functions: dict[tuple[str, str], _Function] = {}
        for module, tree in self.trees.items():
            for node in tree.body:
                if isinstance(node, ast.FunctionDef):
                    self.functions[(module, node.name)] = _Function(module, node, [a.arg for a in node.args.args])
        self.fields_calls_seen: set[tuple[str, int]] = set()
        self.descriptions = _field_comments()

    # -- resolving names ---------------------------------------------------------------------------

    def _function(self, module: str, func: ast.expr) -> _Function | None:
        if isinstance(func, ast.Name):
            if (module, func.id) in self.functions:
                return self.functions[(module, func.id)]
            for other in LOADER_MODULES:  # from .pools import pools
                if (other, func.id) in self.functions and func.id in vars(self.modules[module]):
                    return self.functions[(other, func.id)]
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in LOADER_MODULES:
            return self.functions.get((func.value.id, func.attr))
        return None

    def _constant(self, module: str, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Tuple):
            values: list[Any] = []
            for e in node.elts:
                if isinstance(e, ast.Starred):  # ("keys", *_JWKS_KEYS): a tuple constant spliced in
                    values.extend(self._constant(module, e.value))
                else:
                    values.append(self._constant(module, e))
            return tuple(values)
        if isinstance(node, ast.Name):
            return getattr(self.modules[module], node.id)
        raise ValueError(ast.unparse(node))

    # -- what a function does with a parameter -----------------------------------------------------------

    def value_schema(self, function: _Function, param: str) -> dict[str, Any]:
        """The schema of what ``function`` accepts in its parameter ``param``."""
        body = function.node
        aliases = {param}
        for node in ast.walk(body):  # cache_at = fields.get("cache") style aliases are handled by the caller
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(body):
            call = node if isinstance(node, ast.Call) else None
            if call is None or not call.args or not _is_name(call.args[0], aliases):
                continue
            method = _reader_method(call)
            if method == "fields":
                return self.mapping_schema(function, call)
            if method == "items":
                return {"type": "array", "items": self._items_schema(function, call)}
            if method == "entries":
                return {"type": "object", "additionalProperties": self._entries_schema(function, call)}
            if method is not None:
                return self._with_words(self.scalar_schema(function.module, method, call), body, aliases)
        for node in ast.walk(body):  # handed on: def f(r, at): return g(r, at)
            if isinstance(node, ast.Call) and len(node.args) >= 2 and _is_name(node.args[1], aliases):
                inner = self._function(function.module, node.func)
                if inner is not None and len(inner.params) >= 2:
                    return self.value_schema(inner, inner.params[1])
        return {}

    def _with_words(self, schema: dict[str, Any], body: ast.FunctionDef, aliases: set[str]) -> dict[str, Any]:
        """``if r.text(at, ...) == "auto": ...`` beside the typed read: the value may also be that word."""
        words = [
            node.comparators[0].value
            for node in ast.walk(body)
            if isinstance(node, ast.Compare) and isinstance(node.ops[0], ast.Eq)
            and isinstance(node.left, ast.Call) and _reader_method(node.left) == "text"
            and node.left.args and _is_name(node.left.args[0], aliases)
            and isinstance(node.comparators[0], ast.Constant) and isinstance(node.comparators[0].value, str)
        ]  # fmt: skip
        if not words or schema.get("enum") is not None:
            return schema
        return {"anyOf": [schema, {"enum": words}]}

    def scalar_schema(self, module: str, method: str, call: ast.Call) -> dict[str, Any]:
        if method in ("integer", "integers"):
            low, high = (self._constant(module, a) for a in call.args[1:3])
            number = {"type": "integer", "minimum": low, "maximum": high}
            return number if method == "integer" else {"type": "array", "items": number}
        if method == "number":
            low, high = (self._constant(module, a) for a in call.args[1:3])
            return {"type": "number", "exclusiveMinimum": low, "maximum": high}
        if method == "choice":
            return {"enum": list(self._constant(module, call.args[1]))}
        return dict(SCALARS.get(method, {}))

    def _loop_target(self, function: _Function, source: ast.Call, pairs: bool) -> set[str]:
        """Names bound to each item of ``source`` (``for item in r.items(...)`` or ``items = ...; for item in items``)."""
        holders = {id(source)}
        names: set[str] = set()
        for node in ast.walk(function.node):
            if isinstance(node, ast.Assign) and node.value is source:
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        targets: set[str] = set()
        for node in ast.walk(function.node):
            if not isinstance(node, ast.For):
                continue
            it = node.iter
            if isinstance(it, ast.BoolOp):  # r.items(...) or []
                it = it.values[0]
            if isinstance(it, ast.Call) and isinstance(it.func, ast.Attribute) and it.func.attr == "values":
                it = it.func.value  # entries.values()
            if id(it) in holders or _is_name(it, names):
                target = node.target
                if pairs and isinstance(target, ast.Tuple):
                    target = target.elts[1]
                if isinstance(target, ast.Name):
                    targets.add(target.id)
        return targets

    def _items_schema(self, function: _Function, call: ast.Call) -> dict[str, Any]:
        return self._element(function, self._loop_target(function, call, pairs=False))

    def _entries_schema(self, function: _Function, call: ast.Call) -> dict[str, Any]:
        return self._element(function, self._loop_target(function, call, pairs=True))

    def _element(self, function: _Function, names: set[str]) -> dict[str, Any]:
        for node in ast.walk(function.node):
            if isinstance(node, ast.Call) and node.args and _is_name(node.args[0], names):
                method = _reader_method(node)
                if method == "fields":
                    return self.mapping_schema(function, node)
                if method is not None:
                    return self.scalar_schema(function.module, method, node)
        return {}

    def mapping_schema(self, function: _Function, call: ast.Call) -> dict[str, Any]:
        """The schema of one ``r.fields(...)`` call: its keys, each typed by what the function does with it."""
        self.fields_calls_seen.add((function.module, call.lineno))
        keywords = {k.arg: self._constant(function.module, k.value) for k in call.keywords if k.arg}
        required = list(keywords.get("required", ()))
        optional = list(keywords.get("optional", ()))
        result_names = {
            t.id
            for node in ast.walk(function.node)
            if isinstance(node, ast.Assign) and node.value is call
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        properties = {key: self._key_schema(function, result_names, key) for key in required + optional}
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        if required:
            schema["required"] = required
        if keywords.get("null_is_empty"):
            schema = {"anyOf": [schema, {"type": "null"}]}
        return schema

    def _key_schema(self, function: _Function, holders: set[str], key: str) -> dict[str, Any]:
        aliases: set[str] = set()
        for node in ast.walk(function.node):  # bind_at = fields.get("bind")
            if isinstance(node, ast.Assign) and _is_key_of(node.value, holders, key):
                aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        found: dict[str, Any] = {}
        fallback: dict[str, Any] = {}
        for node in ast.walk(function.node):
            if not isinstance(node, ast.Call):
                continue
            for index, arg in enumerate(node.args):
                if not (_is_key_of(arg, holders, key) or _is_name(arg, aliases)):
                    continue
                method = _reader_method(node)
                if method == "items":  # r.items(fields["ready_pools"]) next to r.strings(...): the typed read wins
                    fallback = {"type": "array", "items": self._items_schema(function, node)}
                elif method in ("fields", "entries", "error", "error_at", "unique"):
                    continue
                elif method is not None and index == 0:
                    found = self.scalar_schema(function.module, method, node)
                elif method is None:
                    inner = self._function(function.module, node.func)
                    if inner is not None and index < len(inner.params):
                        found = self.value_schema(inner, inner.params[index])
                if found:
                    return self._describe(found, key)
        return self._describe(fallback, key)

    def _describe(self, schema: dict[str, Any], key: str) -> dict[str, Any]:
        description = self.descriptions.get(key)
        if description and "description" not in schema and "properties" not in schema:
            return {**schema, "description": description}
        return schema


def _is_name(node: ast.expr, names: set[str]) -> bool:
    """``name`` for a name in ``names``, also wrapped as ``At(name, path)``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "At" and node.args:
        node = node.args[0]
    return isinstance(node, ast.Name) and node.id in names


def _is_key_of(node: ast.expr, holders: set[str], key: str) -> bool:
    """``fields.get("key")`` or ``fields["key"]`` for a ``fields`` in ``holders``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
        target, args = node.func.value, node.args
        return _is_name(target, holders) and bool(args) and isinstance(args[0], ast.Constant) and args[0].value == key
    if isinstance(node, ast.Subscript):
        return _is_name(node.value, holders) and isinstance(node.slice, ast.Constant) and node.slice.value == key
    return False


def _reader_method(call: ast.Call) -> str | None:
    """``fields`` for ``r.fields(...)`` / ``self.fields(...)``; None for anything else."""
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("r", "self"):
        return func.attr
    return None


def _field_comments() -> dict[str, str]:
    """``key → comment`` from schema.py's dataclass fields (``interval_s: float = 5.0  # between two checks``).

    A field named ``x_s`` documents the key ``x`` (durations are written with units in the YAML).
    """
    source = Path(schema_module.__file__ or "").read_text()
    comments: dict[str, list[str]] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line = token.line.strip()
            name = line.split(":", 1)[0].strip()
            if name.isidentifier() and ":" in line and not line.startswith("#"):
                comments.setdefault(name.removesuffix("_s"), []).append(token.string.lstrip("#").strip())
    # A name several dataclasses use (name, timeout, path) would get one of their comments: none is better.
    return {name: texts[0] for name, texts in comments.items() if len(texts) == 1}


def json_schema() -> dict[str, Any]:
    """The whole schema, with ``$schema`` and the keys ``include:`` adds."""
    generator = _Generator()
    root = generator.functions[ROOT_FUNCTION]
    top = generator.value_schema(root, root.params[1])
    top["properties"] = {**COMPOSE_KEYS, **top["properties"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://wsproxy.invalid/schema/wsproxy.yaml.json",
        "title": "wsproxy configuration (wsproxy.yaml)",
        "description": "Generated by `wsproxy schema` from the loader; conf/wsproxy.yaml documents every key.",
        **top,
    }


def fields_calls() -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
    """(every ``r.fields`` call in the loader modules, the ones the schema was generated from): for the tests."""
    generator = _Generator()
    root = generator.functions[ROOT_FUNCTION]
    generator.value_schema(root, root.params[1])
    every = {
        (module, node.lineno)
        for module, tree in generator.trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and _reader_method(node) == "fields"
    }
    return every, generator.fields_calls_seen
