"""YAML text → one tree of nodes: ``include:`` files merged in, ``${VAR}`` substituted.

This is the step before the ``Reader`` (``config.reader``) walks the tree. It
does three things, and records a located ``ConfigError`` for each problem:

- **File names on nodes.** Every node's marks get the name of the file it came
  from, so an error in an included file is reported at that file's line.
- **Interpolation.** In every scalar, ``${VAR}`` is replaced by the
  environment variable ``VAR`` and ``${VAR:-default}`` by ``VAR``, or
  ``default`` when ``VAR`` is unset or empty (the shell's rule). ``$${`` is a
  literal ``${``. An unset ``${VAR}`` without a default is an error at the
  scalar. A plain (unquoted) scalar is typed after substitution, as if the
  value had been written there: ``port: ${PORT}`` with ``PORT=8080`` is the
  integer 8080; a quoted one stays a string. Keys are not interpolated.
- **Includes.** ``include: ["conf.d/*.yaml"]`` at the top of the main file
  names more files (glob patterns, relative to the main file; matches are taken
  in sorted order; a pattern without wildcards must match a file). Each
  included file is a mapping of top-level sections, merged into the main file:

  - ``listeners`` and ``routes``: the lists are appended, main file first,
    then the included files in order (route order matters: first match wins);
  - ``pools``: merged by name; a pool defined in two files is an error
    located in both;
  - any other section (``timeouts``, ``admin``...): defined in one file only;
    defined twice, it is an error located in both.

  Included files cannot include further (``include`` there is an error).

No section logic here, and no file is read but the included configs, through
the ``ConfigTexts`` given (``config.snapshot``: the disk, or the snapshot of
the config in effect, so that a worker composes what the supervisor
validated).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator, Mapping

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from wsproxy.config.durations import quote
from wsproxy.config.files import FileRefused
from wsproxy.config.snapshot import ConfigTexts
from wsproxy.errors import ConfigError

_STR = "tag:yaml.org,2002:str"
#: ``${NAME}`` or ``${NAME:-default}``, or the escape ``$${``.
_VARIABLE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_RESOLVER = Resolver()

#: Top-level sections whose lists an included file appends to.
APPENDED = ("listeners", "routes")
#: Top-level sections whose entries an included file adds to, by name.
MERGED = ("pools",)


class Composed:
    """The errors found while composing, and the files read (the main one first)."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        self.files: list[str] = []
        self.failed: set[int] = set()  # id() of scalars with an unset variable: the Reader says nothing more of them

    def error(self, node: Node, path: str, message: str) -> None:
        mark = node.start_mark
        self.errors.append(ConfigError(mark.name, mark.line + 1, mark.column + 1, path, message))


def compose(
    text: str,
    filename: str,
    *,
    environ: Mapping[str, str] | None = None,
    composed: Composed | None = None,
    texts: ConfigTexts | None = None,
) -> tuple[Node | None, Composed]:
    """The main file's tree with its includes merged in; YAML syntax errors raise ``yaml.YAMLError``.

    Included files are read from ``texts`` (default: the disk).

    Problems found here (an unset variable, a missing include, a section
    defined twice) are in the returned ``Composed.errors``; the tree is still
    returned, so the Reader can find the rest.
    """
    env = os.environ if environ is None else environ
    texts = texts or ConfigTexts()
    composed = composed or Composed()
    composed.files.append(filename)
    root = _compose_one(text, filename, env, composed)
    if not isinstance(root, MappingNode):
        return root, composed
    includes = [(k, v) for k, v in root.value if isinstance(k, ScalarNode) and k.value == "include"]
    if not includes:
        return root, composed
    root.value = [(k, v) for k, v in root.value if not (isinstance(k, ScalarNode) and k.value == "include")]
    for _key, value in includes:
        for path, at in _included_files(value, filename, composed, texts):
            if path in composed.files:
                composed.error(at, "include", f"{path} is included twice")
                continue
            composed.files.append(path)
            try:
                sub_text = texts.read(path)
            except (FileRefused, OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                composed.error(at, "include", f"cannot read {path}: {reason}")
                continue
            try:
                sub = _compose_one(sub_text, path, env, composed)
            except yaml.YAMLError as exc:
                from wsproxy.config.load import syntax_error

                composed.errors.append(syntax_error(path, sub_text, exc))
                continue
            if sub is None:
                continue
            if not isinstance(sub, MappingNode):
                composed.error(sub, "", "an included file must be a mapping of top-level sections")
                continue
            _merge(root, sub, composed)
    return root, composed


def _compose_one(text: str, filename: str, env: Mapping[str, str], composed: Composed) -> Node | None:
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is None:
        return None
    for node, path, is_key in _walk(root):
        node.start_mark.name = filename
        node.end_mark.name = filename
        if isinstance(node, ScalarNode) and not is_key and "$" in node.value:
            _interpolate(node, path, env, composed)
    return root


def _walk(root: Node) -> Iterator[tuple[Node, str, bool]]:
    """(node, its YAML path, is a key) for every node once (an alias shares its anchor's node)."""
    seen: set[int] = set()
    stack: list[tuple[Node, str, bool]] = [(root, "", False)]
    while stack:
        node, path, is_key = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node, path, is_key
        if isinstance(node, SequenceNode):
            stack.extend((item, f"{path}[{index}]", False) for index, item in enumerate(node.value))
        elif isinstance(node, MappingNode):
            for key, value in node.value:
                name = key.value if isinstance(key, ScalarNode) else "?"
                stack.append((key, path, True))
                stack.append((value, f"{path}.{name}" if path else str(name), False))


def _interpolate(node: ScalarNode, path: str, env: Mapping[str, str], composed: Composed) -> None:
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value:  # ${VAR:-default}: unset or empty takes the default
            return value
        if default is not None:
            return default
        if value is None:
            missing.append(name)
        return ""

    value = _VARIABLE.sub(substitute, node.value)
    if value == node.value:
        return
    if missing:
        composed.failed.add(id(node))
    for name in missing:
        composed.error(
            node, path, f"environment variable {name} is not set (in {quote(node.value)}; ${{{name}:-default}} gives a default)"
        )
    if node.style is None:  # plain: typed by what it now says; quoted: still a string
        node.tag = _RESOLVER.resolve(ScalarNode, value, (True, False))  # type: ignore[no-untyped-call]
    node.value = value


def _included_files(value: Node, main: str, composed: Composed, texts: ConfigTexts) -> Iterator[tuple[str, Node]]:
    """(path, the pattern's node) for each file an ``include`` names, in order."""
    items = value.value if isinstance(value, SequenceNode) else [value]
    base = os.path.dirname(os.path.abspath(main))
    for item in items:
        if not isinstance(item, ScalarNode) or not item.value:
            composed.error(item, "include", "expected a list of file names or glob patterns")
            continue
        pattern = os.path.join(base, item.value)
        if not glob.has_magic(pattern):
            yield pattern, item
            continue
        for path in texts.glob(pattern):
            yield path, item


def _merge(root: MappingNode, sub: MappingNode, composed: Composed) -> None:
    """Merge an included file's sections into the main tree (the module docstring's rules)."""
    index = {k.value: i for i, (k, _v) in enumerate(root.value) if isinstance(k, ScalarNode)}
    for key, value in sub.value:
        name = key.value if isinstance(key, ScalarNode) else None
        if name == "include":
            composed.error(key, "include", "an included file cannot include further files")
            continue
        if name not in index:
            index[name] = len(root.value)
            root.value.append((key, value))
            continue
        first_key, first = root.value[index[name]]
        if name in APPENDED and isinstance(first, SequenceNode) and isinstance(value, SequenceNode):
            joined = SequenceNode(first.tag, [*first.value, *value.value], first.start_mark, first.end_mark, first.flow_style)
            root.value[index[name]] = (first_key, joined)
        elif name in MERGED and isinstance(first, MappingNode) and isinstance(value, MappingNode):
            # Duplicate names are left in: the Reader reports each at both places.
            joined_map = MappingNode(first.tag, [*first.value, *value.value], first.start_mark, first.end_mark, first.flow_style)
            root.value[index[name]] = (first_key, joined_map)
        else:
            where = f"{first_key.start_mark.name}:{first_key.start_mark.line + 1}"
            composed.error(key, "", f"section {quote(str(name))} is defined twice (first at {where}); only listeners and routes are appended and pools merged")
