"""Every exception wsproxy raises on purpose is a WsproxyError (errors.py draws the tree)."""

from __future__ import annotations

import ast
import importlib
import pathlib

import wsproxy
from wsproxy.errors import WsproxyError

PACKAGE = pathlib.Path(wsproxy.__file__).parent
PRIVATE_CONTROL_FLOW = {"_Done", "_NoAnswer"}  # never escape the function that raises them


def exception_classes() -> list[tuple[str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        module = ".".join(("wsproxy", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name not in PRIVATE_CONTROL_FLOW:
                bases = {ast.unparse(b) for b in node.bases}
                if bases & {"Exception", "WsproxyError"} or any(b.endswith(("Error", "Exception")) for b in bases):
                    found.append((module, node.name))
    return found


def test_every_exception_class_is_in_the_tree() -> None:
    classes = exception_classes()
    assert len(classes) >= 10
    outside = [
        f"{module}.{name}" for module, name in classes
        if not issubclass(getattr(importlib.import_module(module), name), WsproxyError)
    ]
    assert outside == []


def test_the_tree_in_errors_py_names_every_class() -> None:
    doc = importlib.import_module("wsproxy.errors").__doc__ or ""
    missing = [name for _module, name in exception_classes() if name not in doc and name != "WsproxyError"]
    assert missing == []
