"""Microbenchmark of the frame scanner: the compiled (mypyc) module beside its pure-Python source.

    python bench/scanner_micro.py             # run from the repository root, with the project's venv
    python bench/scanner_micro.py --repeat 9

Feeds typical reads to ``FrameScanner.feed`` and prints the CPU cost per frame of
both implementations and their ratio: 16 × 1 KiB binary frames in one read, 16 ×
1 KiB text frames in one read (ASCII, and text with multi-byte UTF-8, both checked
by the scanner), each as a client sends them (masked) and as a server does
(unmasked), and one 64 KiB binary frame arriving in 4 reads. ``default`` is what
``import wsproxy.proto.frames`` gives (the extension where the install compiled it;
the script says which); ``pure`` is the ``.py`` executed as a separate module.

Each figure is the minimum over ``--repeat`` timeit runs (stdlib ``timeit``, auto-ranged
to about 0.2 s each), the two implementations' runs interleaved. On a machine shared with
other work the absolute figures move; the ratio between the two is what to read.

What this is not: a relay benchmark (bench/run.py measures the proxy end to end).
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsproxy._mypyc import FALLBACK, is_compiled, load_pure_copies  # noqa: E402
from wsproxy.proto import frames  # noqa: E402

MASK = b"\x37\xfa\x21\x3d"


def frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One final frame (RFC 6455 §5.2), masked with ``MASK`` when ``masked``."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, (0x80 if masked else 0) | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, (0x80 if masked else 0) | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, (0x80 if masked else 0) | 127)) + n.to_bytes(8, "big")
    if not masked:
        return header + payload
    return header + MASK + frames.unmask_portable(payload, MASK)


ASCII_KIB = (b'{"room":"lobby","from":"ada","text":"' + b"x" * 1024)[:1022] + b'"}'
UTF8_KIB = ("caf\u00e9 \u20ac \u2603 \U0001f600 " * 64).encode()[:1024].decode("utf-8", "ignore").encode()
BINARY_KIB = bytes(range(256)) * 4


def workloads() -> list[tuple[str, bool, list[bytes], int]]:
    """``(name, from_client, reads, frames in the reads)``."""
    cases: list[tuple[str, bool, list[bytes], int]] = []
    for from_client, side in ((True, "masked"), (False, "unmasked")):
        cases.append((f"16 x 1 KiB binary, {side}", from_client, [frame(2, BINARY_KIB, masked=from_client) * 16], 16))
        cases.append((f"16 x 1 KiB text ASCII, {side}", from_client, [frame(1, ASCII_KIB, masked=from_client) * 16], 16))
        cases.append((f"16 x 1 KiB text UTF-8, {side}", from_client, [frame(1, UTF8_KIB, masked=from_client) * 16], 16))
    for from_client, side in ((True, "masked"), (False, "unmasked")):
        whole = frame(2, bytes(65536), masked=from_client)
        step = -(-len(whole) // 4)
        reads = [whole[i : i + step] for i in range(0, len(whole), step)]
        cases.append((f"1 x 64 KiB binary in 4 reads, {side}", from_client, reads, 1))
    return cases


def timer(module: ModuleType, from_client: bool, reads: list[bytes]) -> tuple[timeit.Timer, int]:
    """A timer feeding ``reads`` to a fresh scanner of ``module``, and its auto-ranged loop count."""
    scanner = module.FrameScanner(from_client=from_client)
    feed = scanner.feed
    for chunk in reads:  # every read must pass whole: the figures would mean nothing otherwise
        assert feed(chunk) == chunk and scanner.violation is None, (module.__name__, scanner.violation)

    def run() -> None:
        for chunk in reads:
            feed(chunk)

    clock = timeit.Timer(run)
    return clock, clock.autorange()[0]


def per_frame_us(modules: list[ModuleType], from_client: bool, reads: list[bytes], count: int, repeat: int) -> list[float]:
    """µs per frame of each module, runs interleaved (so that a load change hits both), minimum kept."""
    timers = [timer(module, from_client, reads) for module in modules]
    best = [float("inf")] * len(modules)
    for _ in range(repeat):
        for i, (clock, number) in enumerate(timers):
            best[i] = min(best[i], clock.timeit(number) / number)
    return [seconds / count * 1e6 for seconds in best]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timeit runs per figure (the minimum is kept)")
    args = parser.parse_args()
    pure = load_pure_copies()[frames.__name__]
    default = "compiled (mypyc)" if is_compiled(frames) else f"pure Python ({FALLBACK or 'not compiled'})"
    print(f"default import: {default}; unmasking: {frames.UNMASK_IMPL}; load average {os.getloadavg()[0]:.2f}")
    print()
    print("| reads fed | default µs/frame | pure µs/frame | default / pure |")
    print("|---|---:|---:|---:|")
    for name, from_client, reads, count in workloads():
        fast, slow = per_frame_us([frames, pure], from_client, reads, count, args.repeat)
        print(f"| {name} | {fast:.3f} | {slow:.3f} | {fast / slow:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
