"""What every fuzz target shares: an input reader, findings, and the atheris entry point.

Each ``fuzz/fuzz_*.py`` module defines ``test_one_input(data: bytes) -> None``,
a plain function that checks wsproxy's invariants on one input and raises on a
violation. The function needs no atheris: ``tests/test_fuzz_smoke.py`` replays
the committed seed corpus through it directly, and ``fuzz_main`` hands it to
atheris (libFuzzer) when a target file is run as a program.

This module is not a fuzzer itself and holds no wsproxy logic.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence

try:
    import atheris
except ImportError:  # the seed replay in the test suite runs without it
    atheris = None


class Finding(AssertionError):
    """An invariant broke. ``tag`` names the kind, so a known one can be set aside
    with ``FUZZ_IGNORE=tag,...`` while the fuzzer looks for others."""

    def __init__(self, tag: str, message: str) -> None:
        super().__init__(f"[{tag}] {message}")
        self.tag = tag


def _ignored() -> frozenset[str]:
    return frozenset(t for t in os.environ.get("FUZZ_IGNORE", "").split(",") if t)


def finding(tag: str, message: str) -> None:
    """Raise a Finding, unless ``tag`` is listed in ``FUZZ_IGNORE``."""
    if tag not in _IGNORED:
        raise Finding(tag, message)


_IGNORED = _ignored()


class Reader:
    """Takes typed choices off the front of a fuzz input (a FuzzedDataProvider without atheris).

    Every method works on any input, running out gracefully: past the end,
    numbers are 0 and byte strings empty. Seeds are written in the same layout
    by ``fuzz/make_seeds.py``.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return (self.byte() << 8) | self.byte()

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def blob(self) -> bytes:
        """A length-prefixed (one byte) byte string."""
        return self.take(self.byte())

    def rest(self) -> bytes:
        chunk = self.data[self.pos :]
        self.pos = len(self.data)
        return chunk


def _running_as_fuzzer() -> bool:
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None) or ""
    here = os.path.dirname(os.path.abspath(__file__))
    return atheris is not None and os.path.dirname(os.path.abspath(main_file)) == here


@contextlib.contextmanager
def instrumented(*packages: str) -> Iterator[None]:
    """Import the code under test with coverage instrumentation when fuzzing, plainly otherwise."""
    if _running_as_fuzzer():
        with atheris.instrument_imports(include=list(packages)):
            yield
        if os.environ.get("WSPROXY_PURE") == "1":
            # The mypyc-listed modules were loaded from their source by wsproxy._mypyc, past the
            # import hook above: instrument what is loaded now, or the fuzzer runs blind.
            atheris.instrument_all()
    else:
        yield


def fuzz_main(test_one_input: Callable[[bytes], None], argv: Sequence[str] | None = None) -> None:
    """Run ``test_one_input`` under libFuzzer; ``argv`` carries libFuzzer's flags and corpus dirs."""
    if atheris is None:
        sys.exit("atheris is not installed: run `make fuzz`, or pip install atheris (see fuzz/README.md)")
    atheris.Setup(list(argv if argv is not None else sys.argv), test_one_input)
    atheris.Fuzz()
