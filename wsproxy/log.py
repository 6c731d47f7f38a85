"""Logging set-up: one line per event, ``key=value`` pairs or JSON, to stderr.

Loggers are named after their module (``wsproxy.edge.session``). Messages are
written as ``event=NAME key=value ...`` by the code that logs them (values
that may hold spaces are written with ``%r``), so a line can be read by a
person and split by a machine. This module adds the time, the level and the
logger name, and with ``log.format: json`` turns each line into one JSON
object whose keys are those pairs.
"""

from __future__ import annotations

import ast
import datetime
import json
import logging
import re
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)-5s %(name)s %(message)s"

_PAIR = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")


def parse_pairs(message: str) -> dict[str, object]:
    """The ``key=value`` pairs of a message; quoted values are unquoted, numbers stay text."""
    fields: dict[str, object] = {}
    for key, value in _PAIR.findall(message):
        if value[:1] in ("'", '"'):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        fields[key] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, then the message's pairs."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        pairs = parse_pairs(message)
        if pairs:
            entry.update(pairs)
        else:
            entry["msg"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send wsproxy's log to stderr (the journal keeps it under systemd); callable again on reload."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger("wsproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
