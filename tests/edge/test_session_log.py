"""edge.session_log.SessionLog: each line's leading fields, in order, as the session learns them. No I/O."""

from __future__ import annotations

import json
import logging

import pytest

from wsproxy.edge.session_log import SessionLog
from wsproxy.log import JsonFormatter, TextFormatter, log_event

LOGGER = "wsproxy.edge.session"


class Lines(logging.Handler):
    """The records a logger gets; ``text()`` and ``json()`` as wsproxy's formatters write them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> list[str]:
        formatter = TextFormatter(journal=True)
        return [formatter.format(r).split(f"logger={LOGGER} ", 1)[1] for r in self.records]

    def json(self) -> list[list[str]]:
        return [list(json.loads(JsonFormatter().format(r))) for r in self.records]


@pytest.fixture
def lines() -> Lines:
    logger = logging.getLogger(LOGGER)
    handler = Lines()
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_each_line_leads_with_what_its_shape_names(lines: Lines) -> None:
    log = logging.getLogger(LOGGER)
    session = SessionLog("7f3a1", "-")
    session.set_peer("127.0.0.1:51234")
    session.set_peer("203.0.113.9:5000")  # after a PROXY header
    session.route_event(log, logging.INFO, "refused", kind="no_route", status=404, reason="no route")
    session.peer_event(log, logging.INFO, "tls_failed", reason="bad")
    session.routed("*/chat")
    session.conn_event(log, logging.WARNING, "upstream_failed", pool="chat", backend="10.0.0.3:9000", reason="x")
    session.route_event(log, logging.INFO, "refused", kind="origin", status=403, reason="invalid Origin header: a b")
    session.served("chat", "10.0.0.3:9000")
    session.backend_event(log, logging.INFO, "open", sticky="none", identity="-")
    assert lines.text() == [
        'event=refused conn=7f3a1 peer=203.0.113.9:5000 route=- kind=no_route status=404 reason="no route"',
        "event=tls_failed conn=7f3a1 peer=203.0.113.9:5000 reason=bad",
        "event=upstream_failed conn=7f3a1 pool=chat backend=10.0.0.3:9000 reason=x",
        'event=refused conn=7f3a1 peer=203.0.113.9:5000 route=*/chat kind=origin status=403 reason="invalid Origin header: a b"',
        "event=open conn=7f3a1 peer=203.0.113.9:5000 route=*/chat pool=chat backend=10.0.0.3:9000 sticky=none identity=-",
    ]
    assert lines.json()[-1] == [
        "ts", "level", "logger", "event", "conn", "peer", "route", "pool", "backend", "sticky", "identity",
    ]  # fmt: skip


def test_a_line_already_logged_keeps_the_fields_it_had(lines: Lines) -> None:
    """Records may be formatted later (a queue, pytest's caplog): a change makes a new context, never edits one."""
    log = logging.getLogger(LOGGER)
    session = SessionLog("c1", "127.0.0.1:1")
    session.route_event(log, logging.INFO, "refused", kind="timeout", status=408, reason="slow")
    session.set_peer("127.0.0.1:2")
    session.route_event(log, logging.INFO, "refused", kind="timeout", status=408, reason="slow")
    session.routed("*/later")
    session.route_event(log, logging.INFO, "refused", kind="timeout", status=408, reason="slow")
    session.served("main", "127.0.0.1:9")
    session.backend_event(log, logging.INFO, "open")
    session.served("main", "127.0.0.1:10")
    session.backend_event(log, logging.INFO, "open")
    assert [line.split(" kind=")[0] for line in lines.text()] == [
        "event=refused conn=c1 peer=127.0.0.1:1 route=-",
        "event=refused conn=c1 peer=127.0.0.1:2 route=-",
        "event=refused conn=c1 peer=127.0.0.1:2 route=*/later",
        "event=open conn=c1 peer=127.0.0.1:2 route=*/later pool=main backend=127.0.0.1:9",
        "event=open conn=c1 peer=127.0.0.1:2 route=*/later pool=main backend=127.0.0.1:10",
    ]


def test_the_same_line_as_log_event_writes_it(lines: Lines) -> None:
    log = logging.getLogger(LOGGER)
    session = SessionLog("c2", "[::1]:443")
    session.routed("*/")
    session.served("main", "[::1]:9000")
    session.backend_event(log, logging.INFO, "close", identity="-", by="client", reason="bye now", dur_s=1.5)
    log_event(
        log, logging.INFO, "close", conn="c2", peer="[::1]:443", route="*/", pool="main", backend="[::1]:9000",
        identity="-", by="client", reason="bye now", dur_s=1.5,
    )  # fmt: skip
    first, second = lines.text()
    assert first == second
    first_json, second_json = (json.loads(JsonFormatter().format(r)) for r in lines.records)
    del first_json["ts"], second_json["ts"]
    assert list(first_json.items()) == list(second_json.items())


def test_nothing_is_built_when_the_level_is_off(lines: Lines) -> None:
    log = logging.getLogger(LOGGER)
    session = SessionLog("c3", "127.0.0.1:3")
    session.peer_event(log, logging.DEBUG, "detail", n=1)
    session.conn_event(log, logging.DEBUG, "detail", n=2)
    assert lines.records == [] and session._peer is None  # no context made for a line nobody writes


def test_an_error_line_carries_its_traceback(lines: Lines) -> None:
    log = logging.getLogger(LOGGER)
    session = SessionLog("c4", "127.0.0.1:4")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        session.conn_event(log, logging.ERROR, "error", exc_info=True)
    (record,) = lines.records
    assert record.exc_info is not None and record.funcName == "test_an_error_line_carries_its_traceback"
    assert lines.text()[0].startswith("event=error conn=c4\nTraceback")
