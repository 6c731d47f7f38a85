"""The compiled frame scanner: which one is in use, and the fallback to the pure-Python source.

In CI (``CI`` set, as .ci/run does, with gcc and Python.h on the machine) the
install compiles the scanner, and ``import wsproxy.proto.frames`` must give the
extension: a broken build cannot fall back silently. The fallbacks (no
extension, one that fails to import, a stale one) and the build switches
(``WSPROXY_NO_MYPYC=1``, no working compiler) run against a copy of the package
in a real subprocess; the copies never take a compile (the CI install does that
once), so these tests are quick.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import wsproxy
from wsproxy import _mypyc
from wsproxy.proto import frames

TREE = Path(wsproxy.__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
BUILT = ("*.so", "*.pyd", "*" + _mypyc.SOURCE_DIGEST_SUFFIX)

REPORT = (
    "import wsproxy.proto.frames as f, wsproxy._mypyc as m;"
    "print(f.__file__); print(m.FALLBACK); print(m.describe().splitlines()[0])"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def copy_tree(tmp_path: Path, *, with_extensions: bool) -> Path:
    """A copy of the project (package, setup.py, pyproject.toml) under ``tmp_path``."""
    root = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", *(() if with_extensions else BUILT))
    shutil.copytree(TREE / "wsproxy", root / "wsproxy", ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(TREE / name, root / name)
    return root


def run(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": str(root), **env}
    return subprocess.run(
        [sys.executable, *args], cwd=root, env=environ, capture_output=True, text=True, timeout=60, check=False
    )


def report(root: Path) -> tuple[str, str, str, str]:
    """``(file, FALLBACK, --version's scanner line, stderr)`` of a fresh interpreter importing the copy."""
    done = run(root, "-c", REPORT)
    assert done.returncode == 0, done.stderr
    file, fallback, line = done.stdout.splitlines()
    return file, fallback, line, done.stderr


def test_ci_runs_the_compiled_scanner() -> None:
    """Where the install compiles (CI: gcc, python3-dev), the default import is the extension."""
    switch = os.environ.get("WSPROXY_NO_MYPYC", "")
    if switch not in ("", "0"):
        pytest.skip(f"WSPROXY_NO_MYPYC={switch}: the pure package was installed on purpose")
    if not in_ci() and not _mypyc.is_compiled(frames) and _mypyc.FALLBACK == "not compiled":
        pytest.skip("this tree has no compiled scanner (pip install -e . builds it); CI requires one")
    assert _mypyc.is_compiled(frames), f"pure-Python scanner in use: {_mypyc.FALLBACK}"
    assert frames.__file__ is not None and frames.__file__.endswith(SUFFIX)
    assert _mypyc.FALLBACK == ""


def test_without_an_extension_the_source_is_used_quietly(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, with_extensions=False)
    file, fallback, line, stderr = report(root)
    assert file == str(root / "wsproxy" / "proto" / "frames.py")
    assert fallback == "not compiled"
    assert line == "frame scanner: pure Python; not compiled"
    assert "Warning" not in stderr


def test_an_extension_that_fails_to_import_falls_back_with_a_warning(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, with_extensions=False)
    for name in _mypyc.MYPYC_MODULES:
        (root / (name.replace(".", "/") + SUFFIX)).write_bytes(b"not an ELF file")
    file, fallback, line, stderr = report(root)
    assert file.endswith("frames.py")
    assert fallback.startswith("compiled module failed to import (")
    assert line.startswith("frame scanner: pure Python; compiled module failed to import")
    assert "RuntimeWarning: wsproxy: using the pure-Python " + ", ".join(_mypyc.MYPYC_MODULES) in stderr


FAILING_INIT_C = """
#include <Python.h>
PyMODINIT_FUNC PyInit_%s(void) {
    PyErr_SetString(PyExc_RuntimeError, "Reached allegedly unreachable code!");
    return NULL;
}
"""


def test_an_extension_that_raises_while_initialising_falls_back(tmp_path: Path) -> None:
    """A real extension whose module init raises something other than ImportError (as mypyc's
    compiled code does for a branch it judged unreachable) still leaves the pure source in use."""
    import sysconfig

    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    root = copy_tree(tmp_path, with_extensions=False)
    source = tmp_path / "failing.c"
    first = _mypyc.MYPYC_MODULES[0]  # the group's first import: the one whose failure is reported
    source.write_text(FAILING_INIT_C % first.rpartition(".")[2])
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(source), "-o",
         str(root / (first.replace(".", "/") + SUFFIX))],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build a test extension here: {built.stderr.strip()[:200]}")
    for name in _mypyc.MYPYC_MODULES[1:]:  # the rest of the group: present, so the load is attempted
        (root / (name.replace(".", "/") + SUFFIX)).write_bytes(b"not an ELF file")
    file, fallback, line, stderr = report(root)
    assert file.endswith("frames.py")
    assert fallback.startswith("compiled module failed to import (RuntimeError('Reached allegedly unreachable")
    assert "RuntimeWarning: wsproxy: using the pure-Python " + ", ".join(_mypyc.MYPYC_MODULES) in stderr


def test_version_names_the_scanner(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, with_extensions=False)
    done = run(root, "-m", "wsproxy", "--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"wsproxy {wsproxy.__version__}"
    assert "frame scanner: pure Python; not compiled" in lines


@pytest.fixture
def compiled_copy(tmp_path: Path) -> Path:
    if not _mypyc.is_compiled(frames):
        pytest.skip("needs the compiled scanner (see test_ci_runs_the_compiled_scanner)")
    root = copy_tree(tmp_path, with_extensions=True)
    if not list((root / "wsproxy" / "proto").glob("*" + _mypyc.SOURCE_DIGEST_SUFFIX)):
        pytest.skip("the extension was not built in place (no source digest beside it)")
    return root


def test_a_copy_of_the_build_runs_compiled(compiled_copy: Path) -> None:
    file, fallback, line, stderr = report(compiled_copy)
    assert file == str(compiled_copy / "wsproxy" / "proto" / f"frames{SUFFIX}")
    assert (fallback, line) == ("", "frame scanner: compiled (mypyc)")
    assert stderr == ""


def test_an_edited_source_is_not_shadowed_by_a_stale_extension(compiled_copy: Path) -> None:
    source = compiled_copy / "wsproxy" / "proto" / "frames.py"
    source.write_text(source.read_text() + "\nEDITED_AFTER_THE_BUILD = True\n")
    file, fallback, line, stderr = report(compiled_copy)
    assert file == str(source)
    assert fallback.startswith("stale extension (wsproxy.proto.frames changed since the build")
    assert line.startswith("frame scanner: pure Python; stale extension")
    assert "RuntimeWarning" in stderr


# --- the build's switches (setup.py run directly, in place, on a copy) -----------------


def build_in_place(root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return run(root, "setup.py", "-q", "build_ext", "--inplace", **env)


def test_no_mypyc_switch_builds_the_pure_package(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, with_extensions=False)
    done = build_in_place(root, WSPROXY_NO_MYPYC="1")
    assert done.returncode == 0, done.stderr
    assert "WSPROXY_NO_MYPYC=1: installing the pure-Python modules" in done.stderr
    assert not list((root / "wsproxy").rglob("*.so"))


def test_without_a_working_compiler_the_build_installs_the_pure_package(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, with_extensions=False)
    done = build_in_place(root, CC="/bin/false")
    assert done.returncode == 0, done.stderr
    assert "no working C compiler with Python.h" in done.stderr
    assert not list((root / "wsproxy").rglob("*.so"))


def test_no_mypyc_switch_removes_extensions_an_earlier_editable_install_built(tmp_path: Path) -> None:
    root = copy_tree(tmp_path, with_extensions=False)
    proto = root / "wsproxy" / "proto"
    earlier = [proto / f"frames{SUFFIX}", proto / f"frames{SUFFIX}{_mypyc.SOURCE_DIGEST_SUFFIX}"]
    earlier.append(proto / f"native__mypyc{SUFFIX}")
    for path in earlier:
        path.write_bytes(b"an earlier build")
    done = build_in_place(root, WSPROXY_NO_MYPYC="1")
    assert done.returncode == 0, done.stderr
    assert [path for path in earlier if path.exists()] == []
    assert (proto / "frames.py").exists()
    assert report(root)[1] == "not compiled"


def test_pure_copies_sit_beside_the_default_imports() -> None:
    before = {name: sys.modules[name] for name in _mypyc.MYPYC_MODULES}
    copies = _mypyc.load_pure_copies()
    assert {name: sys.modules[name] for name in _mypyc.MYPYC_MODULES} == before
    for name, copy in copies.items():
        assert copy.__name__ == _mypyc.pure_name(name) and copy.__file__ == str(_mypyc.source_path(name))
        assert not _mypyc.is_compiled(copy)
