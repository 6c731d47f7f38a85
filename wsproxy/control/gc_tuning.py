"""Garbage collector settings for a long-running proxy process.

CPython's cyclic collector runs a young-generation pass every 700 net
allocations of container objects, and every pass walks the objects that are
still young. A proxy allocates a few hundred such objects per handshake (the
request, headers, the session, its scopes and tasks) and almost all of them
die by reference counting within the handshake, so with the default threshold
the collector runs several times a second under a connect storm and walks
objects that would have died a moment later, and the full collections walk
everything imported at start-up. Measured with gc callbacks during a
handshake-heavy run (``bench/README.md``): 7.8 % of the process's CPU in the
collector with the defaults, 2.8 % with these settings.

``tune()`` (called once by ``wsproxy run`` after start-up, before serving):

- ``gc.freeze()``: what exists after start-up (modules, the config, the
  compiled routes) moves to the permanent generation and is never walked
  again;
- ``gc.set_threshold(20_000, 20, 20)``: young passes ~30x less often; objects
  that die by reference counting in between are never walked at all. Memory
  held by cyclic garbage between passes grows by at most that many objects.

``WSPROXY_GC=default`` in the environment keeps Python's defaults (for
comparison in benchmarks). Tests that run an ``App`` in-process do not call
this.
"""

from __future__ import annotations

import gc
import logging
import os
from ..log import log_event

log = logging.getLogger("wsproxy.gc")

THRESHOLDS = (20_000, 20, 20)


def tune() -> None:
    if os.environ.get("WSPROXY_GC", "") == "default":
        log_event(
            log,
            logging.INFO,
            "gc",
            thresholds=",".join(map(str, gc.get_threshold())),
            frozen=0,
            reason="WSPROXY_GC=default",
        )
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    log_event(
        log,
        logging.INFO,
        "gc",
        thresholds=",".join(map(str, THRESHOLDS)),
        frozen=gc.get_freeze_count(),
    )
