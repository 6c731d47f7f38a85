"""Local overload: the proxy's own resources ran out, which is nobody else's fault.

When the process has no file descriptor left (``EMFILE``), the system none
(``ENFILE``), the kernel no buffer or memory (``ENOBUFS``, ``ENOMEM``) or no
free local port for a connect (``EADDRNOTAVAIL``), creating or connecting a
socket fails whatever the backend does. Such a failure:

- is answered with 503 and ``Retry-After`` ("proxy out of file descriptors"),
  not 502: the backend did nothing wrong;
- is not a passive-health failure and not a failed health check (the check
  result is "unknown" and is not recorded), so no healthy backend is ejected
  or marked down because the proxy itself is full;
- is not retried on the next backend, which would fail the same way;
- is logged at WARNING at most once a second per kind, with the number of
  lines left out since the last one (``RateLimitedWarning``).

What this is not: the limit on sessions (``limits.max_connections``, whose
default is derived from the fd limit so that these errors stay rare) or the
accept loop's shedding (``edge.listener``), which use it.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Mapping

from ..errors import LocalOverload
from ..log import log_with
from ..proto.handshake import TEXT_PLAIN, http_response

__all__ = [
    "LOCAL_ERRNOS",
    "OVERLOAD_RESPONSE",
    "RETRY_AFTER_OVERLOAD_S",
    "RateLimitedWarning",
    "is_local_exhaustion",
    "local_overload",
]

#: errno values that mean the proxy (or its machine) is out of a resource.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})

#: ``Retry-After`` of the 503 for a local overload: sessions end and fds come back quickly.
RETRY_AFTER_OVERLOAD_S = 1

#: What a plain listener answers a connection it sheds while out of file descriptors.
OVERLOAD_RESPONSE = http_response(
    503, [(b"Retry-After", b"%d" % RETRY_AFTER_OVERLOAD_S), TEXT_PLAIN], b"proxy out of file descriptors\n"
)

_REASONS = {
    errno.EMFILE: "proxy out of file descriptors",
    errno.ENFILE: "system out of file descriptors",
    errno.ENOBUFS: "proxy out of socket buffers",
    errno.ENOMEM: "proxy out of memory",
    errno.EADDRNOTAVAIL: "proxy out of local ports",
}


def is_local_exhaustion(exc: BaseException) -> bool:
    """Is ``exc`` an ``OSError`` that says the proxy ran out of something?"""
    return isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS


def overload_reason(exc: OSError) -> str:
    """What ran out, in words (``proxy out of file descriptors``)."""
    return _REASONS.get(exc.errno or 0, f"proxy out of resources: {exc.strerror or exc}")


def local_overload(exc: OSError, what: str) -> LocalOverload:
    """The 503 for ``exc`` hit while doing ``what`` (``connect to 10.0.0.3:9000``)."""
    return LocalOverload(
        f"{overload_reason(exc)} ({what}: {exc.strerror or exc})",
        ((b"Retry-After", b"%d" % RETRY_AFTER_OVERLOAD_S),),
    )


class RateLimitedWarning:
    """A WARNING at most every ``interval_s``; the next one says how many were left out.

    One instance per kind of event, so that a flood of one kind never hides
    the first line of another.
    """

    __slots__ = ("logger", "interval_s", "_last", "_suppressed")

    def __init__(self, logger: logging.Logger, interval_s: float = 1.0) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last = float("-inf")
        self._suppressed = 0

    def warning(self, event: str, context: Mapping[str, object] | None = None, /, **fields: object) -> bool:
        """Log ``event`` with ``fields`` plus ``suppressed=N``, or count it; True when it was logged.

        ``context``: fields of the caller's to write first (``log.log_with``), e.g. a session's ``conn``.
        """
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return False
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        log_with(self.logger, logging.WARNING, event, context, **fields, suppressed=suppressed)
        return True
