"""Logging set-up: one line per event, ``key=value`` pairs or JSON, to stderr.

Loggers are named after their module (``wsproxy.edge.session``). Messages are
written as ``event=NAME key=value ...`` by the code that logs them (values
that may hold spaces are written with ``%r``), so a line can be read by a
person and split by a machine. This module adds the time, the level and the
logger name, and with ``log.format: json`` turns each line into one JSON
object whose keys are those pairs.

A value that came from a request (a path segment, a Host header) is written
with ``field()``: as it is when it is a plain token, else quoted and escaped
like ``%r``, so it can neither start a line of its own nor add or override a
``key=value`` pair (in JSON, a pair would override ``event`` or ``level``).
As a second guard, the text format escapes any control character left in a
message (``\n`` → ``\\n``), so one call is always one line.

This module is not where values are chosen: what is logged, and that no
credential ever is, is the logging code's business.
"""

from __future__ import annotations

import ast
import datetime
import json
import logging
import re
import sys

TEXT_FORMAT = "%(asctime)s %(levelname)-5s %(name)s %(message)s"

#: A value written as it is by ``field``: no space, quote, ``=`` or control character.
_PLAIN = re.compile(r"[\w.:/@%+~,\[\]-]+", re.ASCII)
#: What ``field`` keeps of a longer value.
FIELD_MAX_CHARS = 200
#: Characters that end or break a line somewhere (C0, DEL, NEL, U+2028/2029) → their escape.
_CONTROLS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029)}


def field(value: object) -> str:
    """``value`` (text or bytes from outside) fit for ``key=%s``: plain, or quoted with escapes.

    ``field("127.0.0.1:9001")`` is ``127.0.0.1:9001``; ``field("a\nevent=x")`` is
    ``'a\\nevent=x'``, which ``parse_pairs`` reads back as one value. Longer
    values are cut to ``FIELD_MAX_CHARS`` characters and end with ``...``.
    """
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes | bytearray) else str(value)
    if len(text) > FIELD_MAX_CHARS:
        text = text[:FIELD_MAX_CHARS] + "..."
    if _PLAIN.fullmatch(text):
        return text
    return repr(text)


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


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, with control characters in the message escaped: one event, one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        if not message.isprintable():
            record.message = message.translate(_CONTROLS)
        return super().formatMessage(record)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send wsproxy's log to stderr (the journal keeps it under systemd); callable again on reload."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    root = logging.getLogger("wsproxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
