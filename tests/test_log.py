"""Pure tests of the log format (``wsproxy.log``): typed fields, real logfmt, typed JSON, journald priorities.

The text lines are read back with ``parse_logfmt`` (``tests.kit.logfmt``), a parser written
from the logfmt convention (go-logfmt's: bare values end at a space, quoted
values take ``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t`` and ``\\uXXXX``), not
with the module's own reader, so a formatter and a parser sharing one mistake
cannot agree with each other.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.kit.logfmt import parse_logfmt
from wsproxy.log import (
    FIELD_MAX_CHARS,
    Context,
    Event,
    JsonFormatter,
    TextFormatter,
    field,
    log_event,
    logfmt,
    parse_pairs,
    set_process_fields,
    stderr_is_journal,
)

HOSTILE = [
    "main\nlevel=info logger=wsproxy.app event=reloaded generation=99",  # a forged line
    "main\r\nx",
    " event=forged",  # a forged field (overrides event= in JSON)
    "x level=debug logger=evil ts=0",
    "it's \"quoted\" \\ back",
    "\x1b[31mred\x1b[0m",
    "a\u2028b\x85c",
    "'",
    "=",
    "",
]


def event_record(levelno: int, event: str, /, **fields: object) -> logging.LogRecord:
    return logging.LogRecord("wsproxy.control.admin", levelno, __file__, 1, Event(event, fields), (), None)


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_value_stays_one_value_on_one_line_in_both_formats(value: str) -> None:
    rec = event_record(logging.INFO, "admin", action="drain", pool=field(value), backend=field(value.encode()))
    text = TextFormatter().format(rec)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\u2028" not in text and "\x85" not in text
    pairs = parse_logfmt(text)
    assert pairs["event"] == "admin" and pairs["pool"] == value and pairs["backend"] == value
    assert pairs["level"] == "info" and pairs["logger"] == "wsproxy.control.admin"
    assert set(pairs) == {"ts", "level", "logger", "event", "action", "pool", "backend"}
    assert parse_pairs(text)["pool"] == value  # the module's own reader agrees
    entry = json.loads(JsonFormatter().format(rec))
    assert (entry["event"], entry["level"], entry["logger"]) == ("admin", "info", "wsproxy.control.admin")
    assert entry["pool"] == value and set(entry) == {"ts", "level", "logger", "event", "action", "pool", "backend"}


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("127.0.0.1:9001", "127.0.0.1:9001"),
        ("[::1]:9001", "[::1]:9001"),
        ("*/chat", "*/chat"),
        ("it's", '"it\'s"'),  # quoted, so that readers of the older 'single-quoted' lines cannot misread it
        ("missing credentials", '"missing credentials"'),
        ('say "hi"', r'"say \"hi\""'),
        ("a=b", '"a=b"'),
        ("back\\slash", r'"back\\slash"'),
        ("tab\there", r'"tab\there"'),
        ("nul\x00", r'"nul\u0000"'),
        ("", '""'),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (503, "503"),
        (12.503, "12.503"),
        (float("nan"), '"nan"'),
    ],
)
def test_values_are_written_as_logfmt(value: object, text: str) -> None:
    assert logfmt({"k": value}) == f"k={text}"


def test_json_keeps_the_types() -> None:
    rec = event_record(logging.INFO, "close", status=503, dur_s=1.25, tls=False, code=None, reason="x y", up_b=0)
    entry = json.loads(JsonFormatter().format(rec))
    assert entry["status"] == 503 and type(entry["status"]) is int
    assert entry["dur_s"] == 1.25 and entry["tls"] is False and entry["code"] is None and entry["up_b"] == 0
    assert entry["reason"] == "x y"


def test_fields_cannot_override_the_head_in_json() -> None:
    entry = json.loads(JsonFormatter().format(event_record(logging.WARNING, "x", level="debug", logger="evil")))
    assert (entry["level"], entry["logger"]) == ("warning", "wsproxy.control.admin")


def test_a_worker_names_itself_on_every_line_in_both_formats() -> None:
    rec = event_record(logging.INFO, "open", conn="w1x0a2b1")
    assert "worker" not in json.loads(JsonFormatter().format(rec))  # a single process adds nothing of its own
    assert " worker=" not in TextFormatter().format(rec)
    set_process_fields(worker=1)
    try:
        text = TextFormatter(journal=True).format(rec)
        assert text.startswith("<6>level=info logger=wsproxy.control.admin worker=1 event=open conn=w1x0a2b1")
        entry = json.loads(JsonFormatter().format(rec))
        assert list(entry)[:4] == ["ts", "level", "logger", "worker"] and entry["worker"] == 1  # a number, first
        other = TextFormatter().format(logging.LogRecord("wsproxy.x", logging.INFO, __file__, 1, "a library's", (), None))
        assert " logger=wsproxy.x worker=1 msg=" in other
    finally:
        set_process_fields(worker=None)
    assert " worker=" not in TextFormatter().format(rec)


def test_long_values_are_cut() -> None:
    assert field("a" * 1000) == "a" * FIELD_MAX_CHARS + "..."


def test_a_plain_message_stays_one_line() -> None:
    rec = logging.LogRecord("wsproxy.x", logging.INFO, __file__, 1, "event=x reason=%s", ("one\ntwo\x00",), None)
    text = TextFormatter().format(rec)
    assert text.endswith(r"event=x reason=one\ntwo\x00") and "\n" not in text
    other = logging.LogRecord("wsproxy.x", logging.INFO, __file__, 1, "a library's message", (), None)
    assert parse_logfmt(TextFormatter().format(other))["msg"] == "a library's message"
    assert json.loads(JsonFormatter().format(other))["msg"] == "a library's message"


def test_a_traceback_still_spans_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("wsproxy.x", logging.ERROR, __file__, 1, Event("error", {}), (), sys.exc_info())
    text = TextFormatter().format(rec)
    assert text.splitlines()[0].endswith("event=error") and "ValueError: boom" in text
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exception"]


@pytest.mark.parametrize(
    ("level", "priority"),
    [(logging.DEBUG, "<7>"), (logging.INFO, "<6>"), (logging.WARNING, "<4>"), (logging.ERROR, "<3>"),
     (logging.CRITICAL, "<2>")],
)
def test_the_journal_gets_the_priority_and_no_timestamp(level: int, priority: str) -> None:
    rec = event_record(level, "x", a=1)
    text = TextFormatter(journal=True).format(rec)
    assert text.startswith(priority) and "ts" not in parse_logfmt(text[len(priority):])
    line = JsonFormatter(journal=True).format(rec)
    assert line.startswith(priority) and json.loads(line[len(priority):])["a"] == 1
    assert not TextFormatter().format(rec).startswith("<")


def test_journal_stream_is_recognised_by_device_and_inode(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(os.devnull, "w") as stream:
        stat = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert stderr_is_journal(stream)
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
        assert not stderr_is_journal(stream)  # stderr redirected elsewhere: the variable was inherited
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not stderr_is_journal(stream)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not stderr_is_journal(stream)


def test_log_event_formats_nothing_when_the_level_is_off(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("wsproxy.test_log")
    logger.setLevel(logging.INFO)

    class Explodes:
        def __str__(self) -> str:
            raise AssertionError("formatted")

    log_event(logger, logging.DEBUG, "quiet", value=Explodes())
    with caplog.at_level(logging.INFO, logger="wsproxy.test_log"):
        log_event(logger, logging.INFO, "loud", n=3)
    [record] = [r for r in caplog.records if r.name == "wsproxy.test_log"]
    assert isinstance(record.msg, Event) and record.msg.fields == {"n": 3}
    assert record.getMessage() == "event=loud n=3"
    assert record.funcName == "test_log_event_formats_nothing_when_the_level_is_off"  # the caller, not log.py


def test_the_timestamp_is_datetimes_own_text() -> None:
    """The cached date part plus milliseconds gives what ``datetime.isoformat`` gives, roundings included."""
    import datetime
    import random

    from wsproxy.log import _timestamp

    rng = random.Random(7)
    moments = [rng.uniform(1.7e9, 1.9e9) for _ in range(20_000)]
    moments += [round(m, 3) - 4e-7 for m in moments[:5000]]  # just under a millisecond or second boundary
    moments += [1767225599.9999996, 1767225600.0, 1767225599.0005]
    for created in moments:
        expected = datetime.datetime.fromtimestamp(created, datetime.timezone.utc).isoformat(timespec="milliseconds")
        assert _timestamp(created) == expected, created


@given(st.text(max_size=40))
@settings(max_examples=400, deadline=None)
def test_any_text_value_reads_back_as_itself_from_one_line(value: str) -> None:
    # the bare test is str.isprintable plus four characters (log._NOT_BARE), not the _BARE regex:
    # whatever it lets through bare must still read back whole
    text = TextFormatter().format(event_record(logging.INFO, "admin", pool=value, after="x"))
    assert "\n" not in text and "\r" not in text and "\x85" not in text and "\u2028" not in text
    pairs = parse_logfmt(text)
    assert pairs["pool"] == value and pairs["after"] == "x"


def test_a_context_writes_its_pairs_as_a_plain_mapping_would() -> None:
    fields = {"conn": "7a8f1", "peer": "127.0.0.1:5", "route": HOSTILE[0], "pool": "", "backend": "it's"}
    context = Context(fields)
    kept = Event("close", {"by": "client", "code": 1000}, context)
    plain = Event("close", {"by": "client", "code": 1000}, dict(fields))
    assert str(kept) == str(plain) == logfmt({"event": "close", **fields, "by": "client", "code": 1000})
    assert str(kept) == str(kept)  # the second line reuses the context's text
    assert str(Event("open", {}, context)) == logfmt({"event": "open", **fields})
    assert str(Event("x", {"a": 1})) == "event=x a=1"
    assert str(Event("x", {"pool": "p2"}, context)) == logfmt({"event": "x", **fields, "pool": "p2"})  # written once
    pairs = parse_logfmt(TextFormatter().format(logging.LogRecord("wsproxy.x", logging.INFO, __file__, 1, kept, (), None)))
    assert pairs["route"] == HOSTILE[0] and pairs["backend"] == "it's" and pairs["code"] == "1000"


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., io.StringIO]]:
    """``configure(...)`` writing to a StringIO as stderr (made in the test: capture swaps stderr after fixtures).

    The ``wsproxy`` logger and the direct path are restored after.
    """
    import wsproxy.log as wlog

    top = logging.getLogger("wsproxy")
    saved = (top.handlers[:], top.level, top.propagate, wlog._direct)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)

    def configure(*args: str) -> io.StringIO:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        wlog.configure(*args)
        return stream

    yield configure
    top.handlers[:], top.level, top.propagate, wlog._direct = saved


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_direct_path_writes_what_logging_writes(configured: Callable[..., io.StringIO], fmt: str) -> None:
    """Lines that skip the LogRecord (``_Direct``) are the lines the handler would have written."""
    import wsproxy.log as wlog

    stream = configured("info", fmt)
    assert wlog._direct is not None
    logger = logging.getLogger("wsproxy.edge.session")
    context = Context(conn="c1", peer="127.0.0.1:4000")
    fields = {"by": "client", "reason": HOSTILE[0], "client_code": 1000, "dur_s": 0.25, "tls": False, "x": None}
    wlog.log_with(logger, logging.INFO, "close", context, **fields)
    direct = stream.getvalue()
    handler = wlog._direct.handler
    handler.addFilter(lambda record: True)  # anything in the way: the record path
    try:
        wlog.log_with(logger, logging.INFO, "close", context, **fields)
    finally:
        handler.filters.clear()
    through_logging = stream.getvalue()[len(direct) :]
    assert direct.count("\n") == 1 and through_logging.count("\n") == 1
    if fmt == "text":
        first, second = parse_logfmt(direct), parse_logfmt(through_logging)
    else:
        first, second = json.loads(direct), json.loads(through_logging)
    assert first.pop("ts")[:16] == second.pop("ts")[:16]  # the same minute at least
    assert first == second and first["reason"] == HOSTILE[0] and first["event"] == "close"


def test_a_handler_in_the_way_gets_the_records(configured: Callable[..., io.StringIO]) -> None:
    """A test's capture or an embedder's handler on the path sees every record (the direct path steps aside)."""
    stream = configured("info")
    logger = logging.getLogger("wsproxy.edge.session")
    seen: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    catch = Catch()
    logger.addHandler(catch)
    try:
        log_event(logger, logging.INFO, "open", conn="c2")
    finally:
        logger.removeHandler(catch)
    assert [r.msg.name for r in seen if isinstance(r.msg, Event)] == ["open"]
    assert parse_logfmt(stream.getvalue().rstrip("\n"))["conn"] == "c2"  # and the configured handler wrote it too
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log_event(logger, logging.ERROR, "error", exc_info=True, conn="c3")
    assert "RuntimeError: boom" in stream.getvalue()  # tracebacks go through logging


class CountingStream(io.StringIO):
    """stderr that counts its flushes: one per write system call on a real stream."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def test_lines_are_written_in_batches_while_the_batching_task_runs(
    configured: Callable[..., io.StringIO], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One write per batch, at most BATCH_DELAY_S late; other lines and tracebacks at once, after the lines before them."""
    import trio
    import trio.testing

    import wsproxy.log as wlog

    configured("info")
    stream = CountingStream()
    monkeypatch.setattr(wlog._direct.handler, "stream", stream)  # type: ignore[union-attr]
    logger = logging.getLogger("wsproxy.edge.session")
    written_at: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wlog.write_in_batches)
            await trio.testing.wait_all_tasks_blocked()
            begun = trio.current_time()
            for i in range(10):
                log_event(logger, logging.INFO, "open", conn=f"c{i}")
            assert stream.getvalue() == "" and stream.flushes == 0  # waiting for their batch
            while not stream.getvalue():
                await trio.sleep(0.0001)
            written_at.append(trio.current_time() - begun)
            assert stream.flushes == 1 and stream.getvalue().count("\n") == 10  # ten lines, one write
            for i in range(wlog.BATCH_LINES):
                log_event(logger, logging.INFO, "open", conn=f"d{i}")
            assert stream.flushes == 2  # a full batch goes at once
            log_event(logger, logging.INFO, "close", conn="e0")
            log_event(logging.getLogger("wsproxy.app"), logging.ERROR, "reload_failed", reason="x")  # at once
            lines = [line for line in stream.getvalue().splitlines() if line.startswith("ts=")]
            assert [parse_logfmt(line)["event"] for line in lines[-2:]] == ["close", "reload_failed"]
            log_event(logger, logging.INFO, "close", conn="e1")
            try:
                raise ValueError("boom")
            except ValueError:
                log_event(logger, logging.ERROR, "error", conn="e2", exc_info=True)  # through logging
            lines = [line for line in stream.getvalue().splitlines() if line.startswith("ts=")]
            assert [parse_logfmt(line)["conn"] for line in lines[-2:]] == ["e1", "e2"]  # in order
            log_event(logger, logging.INFO, "close", conn="last")
            nursery.cancel_scope.cancel()  # the task's end writes what waits

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert written_at[0] == pytest.approx(wlog.BATCH_DELAY_S, abs=2e-4)
    assert stream.getvalue().splitlines()[-1].endswith("conn=last")
    assert wlog._pending is None  # without the task: at once again
    log_event(logger, logging.INFO, "open", conn="after")
    assert stream.getvalue().splitlines()[-1].endswith("conn=after")
