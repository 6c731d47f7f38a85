"""Process helpers for the benchmark: accounting from /proc, limits, tuning (Linux, stdlib only).

CPU time is ``utime + stime`` of ``/proc/PID/stat`` (all threads of the process, in
clock ticks, usually 10 ms); memory is ``VmRSS`` of ``/proc/PID/status``. Both are
summed over a set of PIDs, typically a proxy and its descendants.
"""

from __future__ import annotations

import ctypes
import os
import resource

CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def tune_malloc() -> None:
    """Keep large buffers on the heap in this process (the rig's own processes only).

    Every 256 KiB ``recv`` and every joined send buffer is a fresh allocation. Above glibc's
    (dynamic) mmap threshold each one is mmap()ed, page-faulted in and munmap()ed again,
    which made bulk echo 3x slower at random. A fixed high threshold avoids that.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the ``(comm)`` field, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds consumed so far by ``pids`` (missing PIDs count 0)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:  # fields[11], [12] are utime, stime (stat fields 14, 15)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent outside idle/iowait so far (first line of /proc/stat)."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    guest = sum(fields[8:10])  # guest time is already included in user/nice
    return (sum(fields) - idle - guest) / CLK_TCK


def rss_kib(pids: list[int]) -> int:
    """Sum of VmRSS over ``pids``, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def with_descendants(roots: list[int]) -> list[int]:
    """``roots`` plus every live process descending from one of them."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(name))
    result: list[int] = []
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in result:
            result.append(pid)
            todo.extend(children.get(pid, []))
    return result


def pin_all_threads(pid: int, cpus: set[int]) -> None:
    """Pin every existing thread of ``pid`` (and thereby its future threads) to ``cpus``."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass
