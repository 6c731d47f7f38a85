"""Build script: compile the hot sans-I/O modules with mypyc where a C compiler is available.

Everything else about the package is in pyproject.toml; this file only adds the
extension modules, as black and mypy build themselves. The modules compiled are
``MYPYC_MODULES`` in wsproxy/_mypyc.py (read here without importing the package);
each keeps its ``.py`` beside the extension, and the package falls back to it when
the extension is missing or fails to import (see that module).

The build installs the pure package, saying why on stderr (``pip install -v``
shows it), when:
- ``WSPROXY_NO_MYPYC`` is set to anything but ``0`` or the empty string;
- no C compiler can build against Python.h (on Debian: gcc and python3-dev);
- mypyc or the C compiler fails.

An in-place build (``pip install -e .``) also writes, beside each extension, the
SHA-256 of the source it was compiled from, so that an edited ``.py`` is not
shadowed by a stale extension (the package loads the source and warns instead).

What this is not: a place for metadata or dependencies (pyproject.toml has them).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import os
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The shared library of the compiled group: wsproxy/proto/native__mypyc.*.so
GROUP_NAME = "wsproxy.proto.native"
DIGEST_SUFFIX = ".mypyc-source-sha256"  # as wsproxy/_mypyc.py's SOURCE_DIGEST_SUFFIX
METADATA_COMMANDS = {"egg_info", "dist_info", "sdist"}  # setup.py runs that compile nothing


def say(message: str) -> None:
    print(f"wsproxy setup.py: {message}", file=sys.stderr)


def listed_modules() -> list[str]:
    """``MYPYC_MODULES`` of wsproxy/_mypyc.py, read as a literal (the package is not importable here)."""
    tree = ast.parse((ROOT / "wsproxy" / "_mypyc.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "MYPYC_MODULES":
            assert node.value is not None
            return list(ast.literal_eval(node.value))
    raise RuntimeError("wsproxy/_mypyc.py has no MYPYC_MODULES")


def compiler_problem() -> str | None:
    """Why no extension can be compiled here (None when a test file including Python.h compiles)."""
    from distutils.ccompiler import new_compiler
    from distutils.errors import CCompilerError, DistutilsError
    from distutils.sysconfig import customize_compiler, get_python_inc

    compiler = new_compiler()
    customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.c"
        source.write_text("#include <Python.h>\nint main(void) { return Py_IsInitialized(); }\n")
        try:
            compiler.compile([str(source)], output_dir=tmp, include_dirs=[get_python_inc()])
        except (CCompilerError, DistutilsError, OSError) as exc:
            return f"no working C compiler with Python.h ({exc})"
    return None


def mypyc_extensions(modules: list[str]) -> list[Extension]:
    switch = os.environ.get("WSPROXY_NO_MYPYC", "")
    if switch not in ("", "0"):
        say(f"WSPROXY_NO_MYPYC={switch}: installing the pure-Python modules")
        return []
    problem = compiler_problem()
    if problem:
        say(f"{problem}: installing the pure-Python modules")
        return []
    from mypyc.build import mypycify

    paths = [module.replace(".", "/") + ".py" for module in modules]
    try:
        # Imports mypy cannot see in the isolated build environment (websockets.speedups) are
        # typed at their use; the strict check of the package is `make typecheck`'s job.
        return mypycify(["--ignore-missing-imports", *paths], opt_level="3", group_name=GROUP_NAME)
    except (Exception, SystemExit) as exc:  # mypyc reports a type error by exiting
        say(f"mypyc failed ({exc!r}): installing the pure-Python modules")
        return []


class BuildExt(build_ext):
    """build_ext that never fails the install (the pure modules are the fallback) and, when it
    builds in place (editable installs), records which source each extension was compiled from."""

    def finalize_options(self) -> None:
        # mypyc runs here rather than when setup.py is loaded, and not for metadata (egg_info
        # finalizes build_ext to list sources): pip runs setup.py three times (requirements,
        # metadata, build) and only the build needs the C code. Without mypyc's extensions the
        # placeholders stay (the build command runs build_ext only for a distribution that has
        # extensions) and run() builds nothing.
        building = not set(self.distribution.commands) <= METADATA_COMMANDS
        if building and self.distribution.ext_modules is PLACEHOLDERS:
            self.distribution.ext_modules = mypyc_extensions(MODULES) or PLACEHOLDERS
        super().finalize_options()

    def run(self) -> None:
        if self.distribution.ext_modules is PLACEHOLDERS:
            self.extensions = []
            if self.inplace:
                self.remove_in_place_builds()
            return
        try:
            super().run()
        except Exception as exc:  # a compiler or linker error
            say(f"building the compiled modules failed ({exc}): installing the pure-Python modules")
            self.extensions = []
            if self.inplace:
                self.remove_in_place_builds()
            return
        if self.inplace:
            for module in MODULES:
                extension = Path(self.get_ext_fullpath(module))
                source = ROOT / (module.replace(".", "/") + ".py")
                record = extension.with_name(extension.name + DIGEST_SUFFIX)
                record.write_text(hashlib.sha256(source.read_bytes()).hexdigest() + "\n")

    def remove_in_place_builds(self) -> None:
        """An editable install of the pure package: remove what an earlier one compiled in the tree
        (the extensions would otherwise go on shadowing the sources)."""
        built = (*importlib.machinery.EXTENSION_SUFFIXES, DIGEST_SUFFIX)
        for module in (*MODULES, GROUP_NAME + "__mypyc"):
            path = ROOT / module.replace(".", "/")
            for candidate in path.parent.glob(path.name + ".*"):
                if candidate.name.endswith(built):
                    say(f"removing {candidate.relative_to(ROOT)} (built by an earlier install)")
                    candidate.unlink()

    def build_extension(self, ext) -> None:  # noqa: ANN001 - setuptools' Extension
        try:
            super().build_extension(ext)
        except Exception:
            # Leave no half of the group behind: the package would only fall back anyway.
            for built in self.extensions:
                Path(self.get_ext_fullpath(built.name)).unlink(missing_ok=True)
            raise


MODULES = listed_modules()
# Placeholders that make the distribution one with extensions (so build_ext runs and the
# wheel is platform-specific); BuildExt.finalize_options replaces them with mypyc's when it
# compiles, and BuildExt.run builds nothing when they are still there.
PLACEHOLDERS = [Extension(module, [module.replace(".", "/") + ".py"]) for module in MODULES]
setup(ext_modules=PLACEHOLDERS, cmdclass={"build_ext": BuildExt})
