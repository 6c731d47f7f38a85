"""Logging set-up: one line per event, ``key=value`` pairs, to stderr.

Loggers are named after their module (``wsproxy.edge.session``). Messages are
written as ``event=NAME key=value ...`` by the code that logs them, so a line
can be read by a person and split by a machine; this module only adds the time,
the level and the logger name in front.
"""

from __future__ import annotations

import logging
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)-5s %(name)s %(message)s"


def configure(level: str = "info") -> None:
    """Send wsproxy's log to stderr (the journal keeps it under systemd)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger("wsproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
