"""Reloading: the SIGHUP flow around a new config.

Theory of operation
-------------------
A reload is a new ``Config``, loaded and validated in full (files included) in
a thread, under the running config's ``timeouts.reload``. Applying it
(``App.reload``) first does the only part that can still fail, opening the
sockets of new or moved listeners; if that fails nothing has changed. Then,
without a checkpoint in between: listeners that kept their address keep their
socket and serve the new settings from the next accept on; removed ones stop
accepting; the generation reference is swapped (new sessions use the new
routes and pools at once, established ones keep theirs); health checkers are
updated; sessions whose backend left its pool drain (``control.drain``).
Backend state lives in the registry by address, so it survives; the state of a
backend that left every pool and has no session is forgotten.

The decisions are pure functions of (old, new) in ``config.diff``
(``plan_listeners``, ``removed_backends``, ``plan_checkers``), unit-tested
without sockets. This module holds ``Reloader``, the trio flow of SIGHUP and
``POST /reload``: the loader thread, its deadline, coalescing of signals that
arrive during a reload, and numbered attempts so an HTTP caller waits for
*its* reload; and ``ReloadRecord``, what reloads came to. Applying belongs to
the ``App`` (it owns the sockets and tasks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from ..config.schema import Config
from ..errors import WsproxyError
from ..log import log_event

log = logging.getLogger("wsproxy.reload")


class ReloadError(WsproxyError):
    """A valid config that could not be applied (a new listener could not bind), or one that could not be loaded in time."""


# -- the flow ---------------------------------------------------------------------


class ReloadRecord:
    """What reloads came to: counts, the last success, the last errors; and their log lines.

    Kept by ``Reloader`` (one process) and by the supervisor of ``workers: N``
    (which loads once and applies in every worker); ``logger`` is the one the
    ``reload_failed`` lines go to.
    """

    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger
        self.applied = 0
        self.failed = 0
        self.last_unix: float | None = None
        self.last_error: str | None = None
        self.last_errors: list[str] = []

    def record_applied(self, now_unix: float) -> None:
        self.applied += 1
        self.last_unix = now_unix
        self.last_error = None

    def record_failed(self, errors: Sequence[str], generation: int) -> None:
        """Count and log a refused reload; the old config keeps serving."""
        self.failed += 1
        self.last_errors = list(errors)
        self.last_error = "; ".join(errors)
        for error in errors:
            log_event(self._log, logging.ERROR, "reload_failed", error=error)
        log_event(
            self._log,
            logging.ERROR,
            "reload_failed",
            generation=generation,
            errors=len(errors),
            action='kept_old_config',
        )


class Reloader(ReloadRecord):
    """The SIGHUP / ``POST /reload`` flow and its counters (``ReloadRecord``).

    ``apply`` applies a loaded config or raises ``ReloadError``; ``timeout_s``
    gives the running config's ``timeouts.reload``; ``stopping`` says the
    process is shutting down (no reload then).
    """

    def __init__(self, timeout_s: Callable[[], float], stopping: Callable[[], bool]) -> None:
        super().__init__()
        self._timeout_s = timeout_s
        self._stopping = stopping
        self._running = False  # a reload_from is loading or applying
        self._again = False  # a SIGHUP came during it: load once more when it is done
        self._loader_busy = False  # a loader thread is running (possibly abandoned, still stuck)
        self._attempts = 0
        self._results: dict[int, list[str] | None] = {}  # attempt → errors ([] applied, None not run)
        self._done = trio.Event()

    async def reload_from(
        self,
        path: str,
        load: Callable[[str], Config],
        apply: Callable[[Config], None],
        failed: Callable[[Sequence[str]], None],
    ) -> None:
        """SIGHUP: load ``path`` in a thread, then ``apply`` it, or report why not (``failed``).

        The loader runs under ``timeouts.reload``; past it the reload is
        abandoned (``event=reload_failed``). The thread is abandoned too
        (``abandon_on_cancel``): a loader stuck in a read can delay neither
        this task's end, nor the signal loop, nor a shutdown. While an
        abandoned loader is still stuck, further reloads fail at once rather
        than pile up threads. A SIGHUP that arrives during a reload runs one
        more reload when it is done (they coalesce).
        """
        if self._running:
            self._again = True
            return
        self._running = True
        try:
            while not self._stopping():
                self._again = False
                self._attempts += 1
                attempt, applied, refused = self._attempts, self.applied, self.failed
                await self._once(path, load, apply, failed)
                result = list(self.last_errors) if self.failed != refused else [] if self.applied != applied else None
                self._finish(attempt, result)
                if not self._again:
                    break
        finally:
            self._running = False
            self._done.set()  # a waiter whose reload will not run (shutting down) looks again
            self._done = trio.Event()

    async def _once(
        self,
        path: str,
        load: Callable[[str], Config],
        apply: Callable[[Config], None],
        failed: Callable[[Sequence[str]], None],
    ) -> None:
        from ..errors import ConfigErrors

        if self._loader_busy:
            failed([f"{path}: the loader of an abandoned reload is still stuck; not loading again until it returns"])
            return
        timeout_s = self._timeout_s()

        def load_and_mark() -> Config:
            try:
                return load(path)
            finally:
                self._loader_busy = False  # read by the trio thread; a plain flag is enough

        self._loader_busy = True
        new: Config | None = None
        try:
            with trio.move_on_after(timeout_s):
                new = await trio.to_thread.run_sync(load_and_mark, abandon_on_cancel=True)
        except ConfigErrors as exc:
            failed([str(e) for e in exc.errors])
            return
        except Exception as exc:  # a loader bug must not take the running proxy down
            log_event(log, logging.ERROR, "reload_error", exc_info=True, path=path)
            failed([f"{path}: loading failed: {type(exc).__name__}"])
            return
        if new is None:
            failed([f"{path}: loading did not finish within {timeout_s:g}s (timeouts.reload); abandoned"])
            return
        if self._stopping():
            return
        try:
            apply(new)
        except ReloadError as exc:
            failed([str(exc)])

    async def reload_and_wait(self, start: Callable[[], None]) -> list[str] | None:
        """``POST /reload``: ``start`` a reload (as SIGHUP does), wait for it, return its errors.

        [] when the new config was applied; the errors when it was refused
        (the old config keeps serving); None when the process is shutting down.
        The reload waited for is the first one that starts after this call (one
        already loading may have read the file before it changed).
        """
        if self._stopping():
            return None
        attempt = self._attempts + 1
        start()
        while attempt not in self._results:
            if self._stopping() and not self._running:
                return None
            await self._done.wait()
        return self._results[attempt]

    def _finish(self, attempt: int, result: list[str] | None) -> None:
        self._results[attempt] = result
        for old in [n for n in self._results if n <= attempt - 16]:
            del self._results[old]
        self._done.set()
        self._done = trio.Event()
