"""Rewrite ``log.info("event=NAME k=%s ...", a, ...)`` calls into ``log_event(log, logging.INFO, "NAME", k=a, ...)``.

Run from the repository root: ``python tools/convert_log_calls.py wsproxy`` (files
or directories; rewrites in place, prints every call it could not convert). It
is what converted the call sites to typed fields, kept so that branches written
against the old style can be converted the same way after a merge.

- ``%s``, ``%r``, ``%d``, ``%g`` become the argument itself (typed: numbers stay
  numbers); ``%.Nf`` becomes ``round(arg, N)``; a literal value (``action=exit_now``)
  becomes a string constant, or an int when it is all digits.
- ``log.exception(...)`` becomes ERROR with ``exc_info=True``; ``log.log(level, ...)``
  keeps its level expression.
- Calls whose format is not all ``key=value`` tokens are listed, not changed.

Not part of the package; the standard library only.
"""

from __future__ import annotations

import ast
import keyword
import re
import sys
from pathlib import Path

LEVELS = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR", "exception": "ERROR",
          "critical": "CRITICAL"}
SPEC = re.compile(r"%(?:s|r|d|g|\.(\d)f)")


def convert_call(call: ast.Call, source: str) -> str | None:
    func = call.func
    assert isinstance(func, ast.Attribute)
    args = list(call.args)
    if func.attr == "log":
        level_src = ast.get_source_segment(source, args.pop(0))
    else:
        level_src = f"logging.{LEVELS[func.attr]}"
    if not args or not isinstance(args[0], ast.Constant) or not isinstance(args[0].value, str):
        return None
    fmt, values = args[0].value, args[1:]
    if not fmt.startswith("event=") or any(isinstance(v, ast.Starred) for v in values) or call.keywords:
        return None
    out: list[str] = []
    event = None
    for token in fmt.split():
        key, eq, spec = token.partition("=")
        if not eq or not key.isidentifier():
            return None
        if SPEC.fullmatch(spec):
            if not values:
                return None
            value_src = ast.get_source_segment(source, values.pop(0))
            assert value_src is not None
            digits = SPEC.fullmatch(spec)[1]  # type: ignore[index]
            expr = f"round({value_src}, {digits})" if digits else value_src
        elif "%" in spec:
            return None
        else:
            expr = spec if spec.isdigit() else repr(spec)
        if key == "event":
            if expr.startswith(("'", '"')):
                event = expr
                continue
            return None
        out.append(f"**{{{key!r}: {expr}}}" if keyword.iskeyword(key) else f"{key}={expr}")
    if values or event is None:
        return None
    receiver = ast.get_source_segment(source, func.value)
    extra = ["exc_info=True"] if func.attr == "exception" else []
    parts = [receiver, level_src, event.replace("'", '"'), *extra, *out]
    one_line = f"log_event({', '.join(str(p) for p in parts)})"
    if len(one_line) + call.col_offset <= 110:
        return one_line
    indent = " " * (call.col_offset + 4)
    return "log_event(\n" + "".join(f"{indent}{p},\n" for p in parts) + " " * call.col_offset + ")"


def convert_file(path: Path) -> tuple[int, list[str]]:
    source = path.read_text()
    tree = ast.parse(source)
    edits: list[tuple[int, int, str]] = []
    skipped: list[str] = []
    lines = source.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and (node.func.attr in LEVELS or node.func.attr == "log")):
            continue
        fmt_index = 1 if node.func.attr == "log" else 0
        if len(node.args) <= fmt_index:
            continue
        fmt = node.args[fmt_index]
        text = ast.get_source_segment(source, fmt) or ""
        if "event=" not in text:
            continue
        replacement = convert_call(node, source)
        if replacement is None:
            skipped.append(f"{path}:{node.lineno}: {ast.get_source_segment(source, node)}")
            continue
        assert node.end_lineno is not None and node.end_col_offset is not None
        start = offsets[node.lineno - 1] + node.col_offset
        end = offsets[node.end_lineno - 1] + node.end_col_offset
        edits.append((start, end, replacement))
    for start, end, replacement in sorted(edits, reverse=True):
        source = source[:start] + replacement + source[end:]
    if edits:
        if "log_event" not in {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}:
            source = _add_import(source)
        path.write_text(source)
    return len(edits), skipped


def _add_import(source: str) -> str:
    """``from wsproxy.log import log_event`` (and ``import logging``) after the last top-level import."""
    tree = ast.parse(source)
    last = max(n.end_lineno or 0 for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom))
    lines = source.splitlines(keepends=True)
    new = "from wsproxy.log import log_event\n"
    if not any(isinstance(n, ast.Import) and any(a.name == "logging" for a in n.names) for n in tree.body):
        new = "import logging\n" + new
    return "".join(lines[:last]) + new + "".join(lines[last:])


def main(argv: list[str]) -> int:
    total = 0
    for name in argv or ["wsproxy"]:
        root = Path(name)
        for path in sorted(root.rglob("*.py") if root.is_dir() else [root]):
            count, skipped = convert_file(path)
            total += count
            for line in skipped:
                print(f"not converted: {line}")
    print(f"{total} call(s) converted")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
