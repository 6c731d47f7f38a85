"""The layering of the package, as ../shared/STYLE.md draws it, checked on every import.

Every ``import`` and ``from ... import`` in the package is read with ``ast``,
including imports inside functions and under ``if TYPE_CHECKING:`` (a
type-only arrow is still an arrow a reader must follow). The rules:

- ``proto/``, ``balance/`` and ``config/`` are sans-I/O: they import neither
  trio (nor trio_websocket) nor ``edge``, ``control``, ``app``, ``run`` or
  ``cli``;
- ``proto/`` imports no other wsproxy package but ``errors``, ``types`` and
  ``_mypyc``; ``balance/`` may read ``proto`` and ``config``; ``config/`` may read
  ``proto``;
- ``edge/`` never imports ``control``, ``app`` or ``run``; ``control/`` never imports
  ``app`` or ``run`` (what they need from the App is a Protocol of their own);
- no cycle between the top-level parts (packages and the modules ``app``, ``run``,
  ``cli``, ``__main__``...).

``config.schema`` (the frozen dataclasses) is data every layer may read; it
imports nothing of wsproxy. ``KNOWN`` lists the arrows that still break a
rule, each with what removes it: the list may only shrink (a new forbidden
arrow fails, and so does a listed one that has gone, so the list stays true).
"""

from __future__ import annotations

import ast
import pathlib
from collections import defaultdict

import wsproxy

PACKAGE = pathlib.Path(wsproxy.__file__).parent
TRIO = {"trio", "trio_websocket"}
PURE = {"proto", "balance", "config"}
ALLOWED_INSIDE = {  # part → the wsproxy parts it may import
    "proto": {"proto", "errors", "types", "_mypyc"},
    "balance": {"balance", "proto", "config", "errors", "types"},
    "config": {"config", "proto", "errors", "types"},
}
#: (file, imported module) → what removes the arrow. Shrinks only.
KNOWN: dict[tuple[str, str], str] = {}  # empty: every arrow keeps the rules (issue 11 removed the last nine)
FORBIDDEN = {  # part → parts it must not import
    "edge": {"control", "app", "run", "cli", "__main__"},
    "control": {"app", "run", "cli", "__main__"},
}


def part_of(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    part = rel.parts[0] if len(rel.parts) > 1 else rel.stem
    return "proto" if part == "_mypyc" else part  # the loader of proto's compiled modules belongs to it


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    rel = path.relative_to(PACKAGE)
    package = ["wsproxy", *rel.parts[:-1]]
    if rel.stem == "__init__":
        package = ["wsproxy", *rel.parts[:-1]]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x, y
                    found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
                    continue
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


seen_known: set[tuple[str, str]] = set()


def graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = part_of(path)
        where = path.relative_to(PACKAGE.parent)
        for line, module in imports(path):
            top = module.split(".")[0]
            if top in TRIO and part in PURE:
                violations.append(f"{where}:{line}: {part}/ is sans-I/O but imports {module}")
            if top != "wsproxy":
                continue
            target = module.split(".")[1] if "." in module else "wsproxy"
            target = "proto" if target == "_mypyc" else target
            if target == part or module == "wsproxy.config.schema" or module.startswith("wsproxy.config.schema."):
                continue
            if (str(where), module) not in KNOWN:
                edges[part].add(target)
            allowed = ALLOWED_INSIDE.get(part)
            forbidden = (allowed is not None and target not in allowed) or target in FORBIDDEN.get(part, set())
            if not forbidden:
                continue
            known = (str(where), module) in KNOWN
            if known:
                seen_known.add((str(where), module))
                continue
            violations.append(f"{where}:{line}: {part}/ must not import {module}")
    return edges, violations


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(edges.get(node, ())):
            if nxt in stack:
                cycle = stack[stack.index(nxt):] + [nxt]
                if sorted(cycle[:-1]) not in [sorted(c[:-1]) for c in found]:
                    found.append(cycle)
            elif len(stack) < 12:
                visit(nxt, stack + [nxt])
    for start in sorted(edges):
        visit(start, [start])
    return found


def test_no_forbidden_import() -> None:
    _edges, violations = graph()
    assert violations == []


def test_the_known_exceptions_still_exist() -> None:
    """A listed arrow that is gone must leave the list (it only shrinks)."""
    seen_known.clear()
    graph()
    assert set(KNOWN) - seen_known == set()


def test_no_cycle_between_parts_but_the_known_ones() -> None:
    edges, _ = graph()  # the known arrows are left out of the graph
    assert cycles(edges) == []
