"""Runs the compiled modules' pure tests against both builds, without a copy of the tests.

``wsproxy.proto.frames`` (and every module listed in wsproxy/_mypyc.py) is, by
default, the mypyc extension where the install compiled it. Every test of the
modules in ``BOTH_BUILDS`` runs twice: ``[default]`` with what the imports give,
and ``[pure]`` with the listed modules' ``.py`` executed as separate modules
(``_mypyc.load_pure_copies``): the names the test module imported from a listed
module are swapped for the pure copy's for the duration (module scope, so
hypothesis sees no function-scoped fixture). ``[pure]`` is skipped where the
default import is the pure source already. tests/proto/test_compiled.py checks
that the default is the compiled one where it must be (CI).

What this is not: a patch of the product. Nothing in ``wsproxy`` is changed;
only the test modules' own globals are.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

from wsproxy import _mypyc
from wsproxy.proto import frames

#: Test modules whose tests run against both builds (those of every module listed in wsproxy/_mypyc.py).
BOTH_BUILDS = {
    "tests.proto.test_frames",
    "tests.proto.test_utf8",
    "tests.proto.test_relay_machine",
    "tests.proto.test_handshake",
    "tests.proto.test_request_differential",
    "tests.proto.test_response_differential",
}


@pytest.fixture(scope="session")
def pure_copies() -> dict[str, ModuleType]:
    """The listed modules' pure-Python sources, as their own modules beside the default imports."""
    return _mypyc.load_pure_copies()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__ in BOTH_BUILDS:
        metafunc.parametrize("build", ["default", "pure"], indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def build(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which build the test module's names come from: ``default`` outside ``BOTH_BUILDS``."""
    which: str = getattr(request, "param", "default")
    if which == "default":
        yield which
        return
    if not _mypyc.is_compiled(frames):
        pytest.skip("the default import is the pure-Python source already")
    copies: dict[str, ModuleType] = request.getfixturevalue("pure_copies")
    missing = object()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in list(vars(request.module).items()):
            if isinstance(value, ModuleType):
                continue
            for listed, copy in copies.items():
                if getattr(sys.modules[listed], name, missing) is value:
                    assert not _mypyc.is_compiled(copy)
                    patch.setattr(request.module, name, getattr(copy, name))
                    break
        yield which
