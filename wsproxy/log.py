"""Logging on typed fields: one line per event, logfmt or JSON, to stderr (or the journal).

The code that logs says what happened as data::

    log_event(log, logging.INFO, "open", conn=conn_id, peer=peer, pool=pool, dur_s=1.25, tls=False)

The record's message is an ``Event`` (a name and a dict of fields), which the
formatters below write as

- ``log.format: text``: logfmt, the whole line: ``ts=... level=info
  logger=wsproxy.edge.session event=open conn=7a8f1 ... tls=false``. A value
  is written bare when it is a non-empty run of characters other than space,
  ``"``, ``'``, ``=``, ``\\`` and control characters (``'`` only so that
  readers of the older single-quoted lines cannot misread it); otherwise in double quotes with
  backslash escapes (``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\u00XX``
  for other control characters and the Unicode line breaks), as go-logfmt,
  Loki, Vector and Fluent Bit read it. ``None`` is ``null``, booleans
  ``true``/``false``.
- ``log.format: json``: one object per line, ``ts``, ``level``, ``logger``,
  then the fields with their JSON types (numbers, booleans, ``null``; any other
  object as its ``str``).

While ``write_in_batches`` runs (the proxy runs it for its life), sessions'
open and close lines are written in batches, one ``write`` per 5 ms or 64
lines; every other line, and every line without it, at once.

A process may add fields of its own to every line it writes
(``set_process_fields``): a worker of ``workers`` > 1 adds ``worker=SLOT``,
right after ``logger``, in both formats. A single process adds none.

When stderr is the journal (``$JOURNAL_STREAM`` names stderr's device and
inode, as systemd sets it), each line starts with the syslog priority, ``<3>``
for ERROR to ``<7>`` for DEBUG, so journald stores the level
(``journalctl -p warning`` works), and ``ts=`` is left out: the journal keeps
its own timestamp.

A value that came from outside (a path segment, a Host header) goes through
``field()``, which only decodes bytes and cuts long values: the encoder's
quoting is what keeps it from starting a line or adding a pair, in both
formats. A record whose message is a plain string (a library's, or a call not
converted to ``log_event``) is still one line: in text its control characters
are escaped, and a message of ``key=value`` pairs is written as it is (JSON
reads those pairs back as strings).

This module is not where values are chosen: what is logged, and that no
credential ever is, is the logging code's business.
"""

from __future__ import annotations

import ast
import datetime
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from trio import Event as Event_

#: What ``field`` keeps of a longer value.
FIELD_MAX_CHARS = 200
#: Kept for callers that format a plain message themselves (tests, the demo); ``TextFormatter`` ignores it.
TEXT_FORMAT = "%(asctime)s %(levelname)-5s %(name)s %(message)s"
#: syslog priorities (sd-daemon(3): the ``<N>`` prefix journald reads) of the logging levels.
PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

#: A logfmt value written bare: no space, quote (either), ``=``, backslash or control character (Unicode breaks included).
_BARE = re.compile(r'[^\s"\'=\\\x00-\x1f\x7f\x85\u2028\u2029]+')
#: What keeps a printable string from being bare (``str.isprintable`` rules out every other character ``_BARE`` does).
_NOT_BARE = frozenset(" \"'=\\")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f\x85\u2028\u2029]')
#: Characters that end or break a line somewhere (C0, DEL, NEL, U+2028/2029) → an escape, for plain messages.
_CONTROLS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029)}


class Context(dict[str, object]):
    """Fields kept for many lines (``Event.context``), with their logfmt text made once.

    A plain dict to everything that reads it; ``text`` is the logfmt of its
    pairs, computed on the first text line and kept: the owner replaces a
    context rather than changing it (``edge.session_log``), so the text stays
    true.
    """

    __slots__ = ("_text",)

    @property
    def text(self) -> str:
        try:
            return self._text
        except AttributeError:
            self._text: str = logfmt(self)
            return self._text


class Event:
    """A log record's message: the event's name and its fields, kept as data.

    ``context`` is a mapping of fields the caller keeps for many lines (one
    session's ``conn``, ``peer``...: ``edge.session_log``), written between the
    name and the line's own fields; it is read when the line is formatted, so
    its owner replaces it rather than changing it. ``str()`` gives the logfmt
    pairs (``event=NAME k=v ...``), so a handler that knows nothing of this
    module still writes something readable.
    """

    __slots__ = ("name", "fields", "context")

    def __init__(self, name: str, fields: Mapping[str, object], context: Mapping[str, object] | None = None) -> None:
        self.name = name
        self.fields = fields
        self.context = context

    def pairs(self) -> dict[str, object]:
        if self.context is None:
            return {"event": self.name, **self.fields}
        return {"event": self.name, **self.context, **self.fields}

    def __str__(self) -> str:
        context = self.context
        if context is None:
            head = "event=" + logfmt_value(self.name)
        elif type(context) is Context and context.keys().isdisjoint(self.fields):  # a field may override
            head = "event=" + logfmt_value(self.name) + " " + context.text
        else:
            return logfmt(self.pairs())
        return head + " " + logfmt(self.fields) if self.fields else head


def log_event(
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    level: int,
    event: str,
    /,
    *,
    exc_info: object = False,  # object, not bool: so that **fields of any type type-check
    **fields: object,
) -> None:
    """Log ``event`` at ``level`` with ``fields`` as data (nothing is formatted when the level is off).

    ``exc_info=True`` adds the traceback of the exception being handled.
    """
    if logger.isEnabledFor(level):
        emit(logger, level, Event(event, fields), exc_info, 2)


def log_with(
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    level: int,
    event: str,
    context: Mapping[str, object] | None,
    /,
    *,
    exc_info: object = False,
    **fields: object,
) -> None:
    """``log_event`` with the fields of ``context`` first (after ``event``), without copying them per call."""
    if logger.isEnabledFor(level):
        emit(logger, level, Event(event, fields, context), exc_info, 2)


def emit(
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
    level: int,
    message: Event,
    exc_info: object,
    depth: int,
) -> None:
    """Hand ``message`` to ``logger`` (enabled for ``level``) as the code ``depth`` frames up logged it."""
    if type(logger) is not logging.Logger:  # an adapter (or a Logger subclass): the standard way
        logger.log(level, message, exc_info=bool(exc_info), stacklevel=depth + 1)
        return
    direct = _direct
    if direct is not None and not exc_info and direct.reaches(logger, level):
        direct.write(logger.name, level, message)
        return
    # Logger.log without its findCaller walk (a third of a line's cost): the caller is known.
    caller = sys._getframe(depth)
    code = caller.f_code
    record = logger.makeRecord(
        logger.name,
        level,
        code.co_filename,
        caller.f_lineno,
        message,
        (),  # no %-arguments: the message is the Event
        sys.exc_info() if exc_info else None,
        code.co_name,
    )
    logger.handle(record)


def field(value: object) -> str:
    """``value`` from outside (text or bytes) fit for a field: decoded, and cut to ``FIELD_MAX_CHARS``.

    Quoting is the encoder's: ``logfmt({"pool": field("a\\nevent=x")})`` is
    ``pool="a\\nevent=x"``. Longer values end with ``...``.
    """
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes | bytearray) else str(value)
    if len(text) > FIELD_MAX_CHARS:
        text = text[:FIELD_MAX_CHARS] + "..."
    return text


def _escape(match: re.Match[str]) -> str:
    char = match[0]
    return _ESCAPES.get(char) or f"\\u{ord(char):04x}"


def logfmt_value(value: object) -> str:
    """One value as logfmt writes it: bare, or double-quoted with backslash escapes."""
    kind = type(value)
    if kind is str:  # the common cases first, by exact type (a bool is not an int here)
        assert isinstance(value, str)
        # isprintable: no control character, no Unicode space or line break but " " (what _BARE
        # excludes beyond _NOT_BARE), checked in C; a non-printable string is quoted
        if value and value.isprintable() and _NOT_BARE.isdisjoint(value):
            return value
        return '"' + _NEEDS_ESCAPE.sub(_escape, value) + '"'
    if kind is int:
        return repr(value)
    if value is None:
        return "null"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, int) or math.isfinite(value) else f'"{value}"'
    text = field(value) if isinstance(value, bytes | bytearray) else str(value)
    if _BARE.fullmatch(text):
        return text
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def logfmt(pairs: Mapping[str, object]) -> str:
    """``key=value`` pairs separated by one space (keys are the code's identifiers, never quoted)."""
    return " ".join([f"{key}={logfmt_value(value)}" for key, value in pairs.items()])


def json_value(value: object) -> object:
    """What JSON carries for a field: its own type for null, booleans, numbers and text; else ``str``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes | bytearray):
        return field(value)
    return str(value)


_PAIR = re.compile(r"""(\w+)=("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|\S*)""")


def parse_pairs(line: str) -> dict[str, str]:
    """The ``key=value`` pairs of a logfmt line, unquoted and unescaped (every value is text).

    Also reads the single-quoted values of older lines (``reason='...'``).
    """
    found: dict[str, str] = {}
    for key, value in _PAIR.findall(line):
        if value[:1] == '"':
            value = json.loads(value) if "\\" in value else value[1:-1]
        elif value[:1] == "'":
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        found[key] = value
    return found


#: Fields every line of this process carries (``set_process_fields``), after ``logger``.
_process_fields: dict[str, object] = {}


def set_process_fields(**fields: object) -> None:
    """Add ``fields`` to every line this process writes from now on (a worker: ``worker=SLOT``); None removes one."""
    for key, value in fields.items():
        if value is None:
            _process_fields.pop(key, None)
        else:
            _process_fields[key] = value
    _heads.clear()


#: (level, logger) -> the text line heads' ``level=... logger=... [process fields]``
_heads: dict[tuple[int, str], str] = {}


def _head(levelno: int, name: str) -> str:
    key = (levelno, name)
    head = _heads.get(key)
    if head is None:
        if len(_heads) > 1000:  # loggers come from the code, but a library could make many
            _heads.clear()
        level = logging.getLevelName(levelno).lower()
        head = _heads[key] = logfmt({"level": level, "logger": name, **_process_fields})
    return head


_second: list[object] = [None, ""]  # the last whole second formatted, and its text


def _timestamp(created: float) -> str:
    """``2026-12-02T19:07:31.042+00:00`` (UTC, as ``datetime.isoformat``); the date part once a second."""
    second = int(created)
    micros = round((created - second) * 1e6)  # as datetime rounds a timestamp, then cut to milliseconds
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    millis = micros // 1000
    if _second[0] != second:
        moment = datetime.datetime.fromtimestamp(second, datetime.timezone.utc)
        _second[0], _second[1] = second, moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_second[1]}.{millis:03d}+00:00"


def _priority(levelno: int) -> str:
    level = max((lvl for lvl in PRIORITIES if lvl <= levelno), default=logging.DEBUG)
    return f"<{PRIORITIES[level]}>"


class TextFormatter(logging.Formatter):
    """A logfmt line: ``ts``, ``level``, ``logger``, then the event's fields (a traceback follows on its own lines)."""

    def __init__(self, *_ignored: object, journal: bool = False) -> None:  # TextFormatter(TEXT_FORMAT) still works
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, Event):
            line = self.event_line(record.levelno, record.name, record.created, record.msg)
        else:
            message = record.getMessage()
            if not message.isprintable():
                message = message.translate(_CONTROLS)
            pairs = message if message.startswith("event=") else logfmt({"msg": message})
            line = self._line(record.levelno, record.name, record.created, pairs)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line

    def event_line(self, levelno: int, name: str, created: float, event: Event) -> str:
        """The line of an ``Event`` without a traceback (``format``'s, and ``_Direct``'s without a record)."""
        return self._line(levelno, name, created, str(event))

    def _line(self, levelno: int, name: str, created: float, pairs: str) -> str:
        if self.journal:
            return _priority(levelno) + _head(levelno, name) + " " + pairs
        return "ts=" + _timestamp(created) + " " + _head(levelno, name) + " " + pairs


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, then the fields, typed."""

    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, Event) and not record.exc_info:
            return self.event_line(record.levelno, record.name, record.created, record.msg)
        entry = self._entry(record.levelno, record.name, record.created)
        if isinstance(record.msg, Event):
            for key, value in record.msg.pairs().items():
                entry.setdefault(key, json_value(value))
        else:
            message = record.getMessage()
            pairs = parse_pairs(message) if message.startswith("event=") else {}
            for key, text in pairs.items() or {"msg": message}.items():
                entry.setdefault(key, text)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False)
        return _priority(record.levelno) + line if self.journal else line

    def event_line(self, levelno: int, name: str, created: float, event: Event) -> str:
        """The line of an ``Event`` without a traceback (``format``'s, and ``_Direct``'s without a record)."""
        entry = self._entry(levelno, name, created)
        for key, value in event.pairs().items():
            entry.setdefault(key, json_value(value))
        line = json.dumps(entry, ensure_ascii=False)
        return _priority(levelno) + line if self.journal else line

    @staticmethod
    def _entry(levelno: int, name: str, created: float) -> dict[str, object]:
        entry: dict[str, object] = {
            "ts": _timestamp(created), "level": logging.getLevelName(levelno).lower(), "logger": name
        }  # fmt: skip
        for key, value in _process_fields.items():
            entry[key] = json_value(value)
        return entry


class _Direct:
    """``configure``'s handler, which wsproxy's own event lines reach without a ``LogRecord``.

    While nothing else is in the way (no other handler or filter on the
    logger's path up to ``wsproxy``, as a test's capture or an embedder's
    handler would be), a line is formatted and written here: the same text as
    through ``logging`` (``event_line``), without building the record and
    walking the handlers, most of a line's cost. Anything else, and every line
    with a traceback, goes through ``logging``.
    """

    __slots__ = ("handler", "formatter", "top")

    def __init__(self, handler: logging.StreamHandler[IO[str]], formatter: TextFormatter | JsonFormatter, top: logging.Logger) -> None:
        self.handler = handler
        self.formatter = formatter
        self.top = top

    def reaches(self, logger: logging.Logger, level: int) -> bool:
        """Would ``logger``'s line at ``level`` (enabled) reach this handler and only it?"""
        handler, top = self.handler, self.top
        if handler.filters or level < handler.level or top.filters or top.disabled or top.handlers != [handler]:
            return False
        node: logging.Logger | None = logger
        while node is not top:
            if node is None or node.handlers or node.filters or node.disabled or not node.propagate:
                return False
            node = node.parent
        return True

    def write(self, name: str, level: int, event: Event) -> None:
        line = self.formatter.event_line(level, name, time.time(), event) + self.handler.terminator
        pending = _pending
        if pending is None or event.name not in BATCHED_EVENTS:  # at once, after the lines batched before it
            if pending:
                pending.append(line)
                flush_pending()
            else:
                self.write_text(line)
            return
        pending.append(line)
        if len(pending) == 1:
            if _wake is not None:
                _wake.set()
        elif len(pending) >= BATCH_LINES:
            flush_pending()

    def write_text(self, text: str) -> None:
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        except Exception:  # as StreamHandler.emit: logging.raiseExceptions says whether it is printed
            handler.handleError(logging.makeLogRecord({"name": "wsproxy", "levelno": logging.ERROR, "msg": text}))
        finally:
            handler.release()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """``configure``'s handler: a line through ``logging`` comes after the batched lines written before it."""

    def emit(self, record: logging.LogRecord) -> None:
        if _pending:
            flush_pending()
        super().emit(record)


#: Batched writes (``write_in_batches``): lines formatted but not written yet; None while lines are written at once.
_pending: list[str] | None = None
#: Set by the first line of a batch, for the task that writes it.
_wake: Event_ | None = None
#: The lines that wait for a batch: a session's open and close lines, the ones a busy proxy writes
#: thousands of a second. Every other line (a reload, a refusal, a health change) is written at once.
BATCHED_EVENTS = frozenset({"open", "close"})
#: A batch is written this long after its first line at the latest ...
BATCH_DELAY_S = 0.005
#: ... or as soon as it has this many lines.
BATCH_LINES = 64


def flush_pending() -> None:
    """Write the lines waiting for their batch now, in one write."""
    pending = _pending
    if not pending:
        return
    text = "".join(pending)
    pending.clear()
    direct = _direct
    if direct is not None:
        direct.write_text(text)
    else:  # (logging was handed to an embedder meanwhile)
        sys.stderr.write(text)


async def write_in_batches(delay_s: float = BATCH_DELAY_S) -> None:
    """While this runs, sessions' open and close lines are written in batches: one write per ``delay_s`` at most.

    Under load a proxy writes two lines per session; written one by one,
    each costs a ``write`` system call (and wakes the journal). Here such a
    line waits at most ``delay_s`` (5 ms) or until ``BATCH_LINES`` are
    waiting. Every line of another event (not in ``BATCHED_EVENTS``) is
    written at once, after the lines batched before it, and so is a line
    through ``logging`` (a traceback, another handler): what an operator or
    systemd waits for (a reload's verdict before the READY notification) is
    never late. The proxy runs it for its whole life; when it ends (a
    shutdown, a crash that unwinds) what is waiting is written. A process
    killed with SIGKILL loses the session lines of its last ``delay_s``.
    """
    import trio

    global _pending, _wake
    _pending = []
    try:
        while True:
            if not _pending:
                _wake = trio.Event()
                await _wake.wait()
            await trio.sleep(delay_s)
            flush_pending()
    finally:
        flush_pending()
        _pending = None
        _wake = None


#: Set by ``configure``: the direct path to its handler (None: logging is the embedder's).
_direct: _Direct | None = None


def stderr_is_journal(stream: IO[str] | None = None) -> bool:
    """True when ``$JOURNAL_STREAM`` (``DEVICE:INODE``, set by systemd) is the stream's file."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        stat = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (int(device), int(inode))


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send wsproxy's log to stderr (the journal keeps it under systemd); callable again on reload."""
    global _direct
    flush_pending()  # through the handler they were formatted for
    handler = _Handler(sys.stderr)
    journal = stderr_is_journal(sys.stderr)
    formatter = JsonFormatter(journal=journal) if fmt == "json" else TextFormatter(journal=journal)
    handler.setFormatter(formatter)
    root = logging.getLogger("wsproxy")
    root.handlers[:] = [handler]
    _direct = _Direct(handler, formatter, root)
    root.setLevel(level.upper())
    root.propagate = False
    # Nothing wsproxy writes reads the process id or the thread (journald adds _PID itself):
    # LogRecord skips getpid() and the thread lookup on every line.
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
