"""The modules compiled with mypyc, and loading them with their pure-Python source as the fallback.

``MYPYC_MODULES`` is the one list of modules that ``setup.py`` compiles (it reads
the assignment below without importing the package). Adding a module is one line
here: it must be a typed module of ``wsproxy.proto`` (that package's ``__init__``
loads the list) that compiles cleanly with mypyc.

Every module of the list is the C extension built next to its ``.py`` when
there is one that imports, and the ``.py`` itself otherwise. The modules are
compiled as one group (one shared library; calls between them are direct C
calls), so they are loaded all compiled or all pure, never mixed: a compiled
module calling another would otherwise use a different class than the one the
rest of the process imported. The pure source is used, and ``FALLBACK`` says
why, when:

- no extension was built (no C compiler, ``WSPROXY_NO_MYPYC=1``): normal, no warning;
- an extension fails to import (a missing shared library, an ABI mismatch): a warning;
- an editable install's extension is stale: the ``.py`` changed since it was built
  (the build writes the source's SHA-256 beside an in-place extension): a warning,
  and ``pip install -e .`` rebuilds.

What this is not: a general import hook. Nothing is patched; the fallback only
decides, once, which file each listed module is executed from.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

MYPYC_MODULES: tuple[str, ...] = (
    "wsproxy.proto.handshake",  # first: the others' pure copies import it (relay -> limits -> handshake)
    "wsproxy.proto.upstream_handshake",
    "wsproxy.proto.frames",
    "wsproxy.proto.relay",
)

#: The suffix of the file written beside an extension built in place (editable install):
#: the SHA-256 (hex) of the source it was compiled from.
SOURCE_DIGEST_SUFFIX = ".mypyc-source-sha256"

#: Why the pure-Python source is in use ("" when the compiled modules are, or nothing was loaded yet).
FALLBACK = ""


def is_compiled(module: ModuleType) -> bool:
    """Was ``module`` loaded from a C extension (a mypyc build) rather than from its ``.py``?"""
    origin = getattr(module, "__file__", None) or ""
    return origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def source_path(name: str) -> Path:
    """The ``.py`` file of the listed module ``name`` (it sits beside its extension)."""
    parent, _, leaf = name.rpartition(".")
    package = sys.modules[parent]
    assert package.__file__ is not None
    return Path(package.__file__).parent / f"{leaf}.py"


def source_digest(path: Path) -> str:
    """The SHA-256 (hex) of a source file, as the build records it beside an in-place extension."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_pure(name: str, as_name: str | None = None) -> ModuleType:
    """Execute the pure-Python source of module ``name``, registered as ``as_name`` (default: ``name``).

    Under another name the module is a separate copy beside the default import: the
    tests and ``bench/scanner_micro.py`` run the pure scanner that way.
    """
    module_name = as_name or name
    path = source_path(name)
    loader = importlib.machinery.SourceFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    if as_name is None:
        parent, _, leaf = name.rpartition(".")
        setattr(sys.modules[parent], leaf, module)
    return module


def pure_name(name: str) -> str:
    """The name ``load_pure_copies`` registers the pure copy of ``name`` under."""
    parent, _, leaf = name.rpartition(".")
    return f"{parent}._{leaf}_pure"


def load_pure_copies() -> dict[str, ModuleType]:
    """Pure-Python copies of every listed module, beside the default imports: name -> copy.

    Each copy is registered under ``pure_name(name)``, and while the copies are executed
    the listed names point at them, so that a copy importing another listed module
    (``from .frames import FrameScanner``) gets the other's pure copy, as in a pure install.
    """
    copies: dict[str, ModuleType] = {}
    saved = {name: sys.modules.get(name) for name in MYPYC_MODULES}
    try:
        for name in MYPYC_MODULES:
            copies[name] = sys.modules[name] = load_pure(name, as_name=pure_name(name))
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return copies


def _extension(name: str) -> Path | None:
    """The extension file built for ``name``, if any (what a plain import would pick first)."""
    path = source_path(name)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = path.with_name(path.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def _stale(name: str, extension: Path) -> bool:
    """Has the source changed since an in-place build compiled ``extension``?"""
    record = extension.with_name(extension.name + SOURCE_DIGEST_SUFFIX)
    try:
        built_from = record.read_text().strip()
    except FileNotFoundError:
        return False  # an installed wheel (no record): the source beside it is the one compiled
    return built_from != source_digest(source_path(name))


def load_listed(package: str) -> None:
    """Load every listed module of ``package``: all compiled, or all from their source.

    Called once by the package's ``__init__``, before anything imports the modules.
    """
    global FALLBACK
    names = [name for name in MYPYC_MODULES if name.rpartition(".")[0] == package]
    if not names:
        return
    extensions = [_extension(name) for name in names]
    reason = ""
    if os.environ.get("WSPROXY_PURE") == "1":
        # Chosen: the fuzzers need the source (atheris traces Python, not compiled code),
        # and a benchmark can compare the two builds in one tree.
        reason = "WSPROXY_PURE=1"
    elif any(extension is None for extension in extensions):
        reason = "not compiled"
        if any(extension is not None for extension in extensions):
            reason = "not all compiled: " + ", ".join(
                name for name, extension in zip(names, extensions) if extension is None
            )
    else:
        stale = [name for name, ext in zip(names, extensions) if ext is not None and _stale(name, ext)]
        if stale:
            reason = f"stale extension ({', '.join(stale)} changed since the build; pip install -e . rebuilds)"
    if not reason:
        try:
            for name in names:
                module = importlib.import_module(name)
                if not is_compiled(module):
                    raise ImportError(f"{name} came from {module.__file__}")
        except Exception as exc:  # ImportError, or an error while the extension initialises
            reason = f"compiled module failed to import ({exc!r})"
            for name in names:
                sys.modules.pop(name, None)
    if reason:
        for name in names:
            load_pure(name)
        if reason not in ("not compiled", "WSPROXY_PURE=1"):
            warnings.warn(f"wsproxy: using the pure-Python {', '.join(names)}: {reason}", RuntimeWarning, stacklevel=2)
    FALLBACK = reason


def describe() -> str:
    """What ``wsproxy --version`` says about the frame scanner (two lines)."""
    from .proto import frames

    if is_compiled(frames):
        scanner = "compiled (mypyc)"
    else:
        scanner = f"pure Python; {FALLBACK}" if FALLBACK else "pure Python"
    return f"frame scanner: {scanner}\nclient unmasking for the UTF-8 check: {frames.UNMASK_IMPL}"
