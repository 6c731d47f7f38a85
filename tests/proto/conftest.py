"""Runs the frame scanner's pure tests against both implementations, without a copy of the tests.

``wsproxy.proto.frames`` is, by default, the mypyc extension where the install
compiled it (see wsproxy/_mypyc.py). Every test of the modules in
``BOTH_SCANNERS`` runs twice: ``[default]`` with what ``import
wsproxy.proto.frames`` gives, and ``[pure]`` with the module's ``.py`` executed
as a separate module: the names the test module imported from frames are
swapped for the pure module's for the duration (module scope, so hypothesis
sees no function-scoped fixture). ``[pure]`` is skipped where the default
import is the pure source already. tests/proto/test_compiled.py checks that the
default is the compiled one where it must be (CI).

What this is not: a patch of the scanner. Nothing in ``wsproxy`` is changed;
only the test modules' own globals are.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from wsproxy._mypyc import is_compiled, load_pure
from wsproxy.proto import frames

#: Test modules whose tests run against both scanners (add the relay machine's when it is compiled).
BOTH_SCANNERS = {"tests.proto.test_frames", "tests.proto.test_utf8"}

PURE_NAME = "wsproxy.proto._frames_pure"


@pytest.fixture(scope="session")
def pure_frames() -> ModuleType:
    """The scanner's pure-Python source, as its own module beside the default import."""
    return load_pure(frames.__name__, as_name=PURE_NAME)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__ in BOTH_SCANNERS:
        metafunc.parametrize("scanner", ["default", "pure"], indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def scanner(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The scanner module the test runs against (the default import outside ``BOTH_SCANNERS``)."""
    if getattr(request, "param", "default") == "default":
        yield frames
        return
    if not is_compiled(frames):
        pytest.skip("the default import is the pure-Python scanner already")
    pure: ModuleType = request.getfixturevalue("pure_frames")
    assert not is_compiled(pure)
    missing = object()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in list(vars(request.module).items()):
            if getattr(frames, name, missing) is value and not isinstance(value, ModuleType):
                patch.setattr(request.module, name, getattr(pure, name))
        yield pure
