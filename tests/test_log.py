"""Pure tests of the log format (``wsproxy.log``): values from outside cannot forge a line or a field."""

from __future__ import annotations

import json
import logging

import pytest

from wsproxy.log import FIELD_MAX_CHARS, TEXT_FORMAT, JsonFormatter, TextFormatter, field, parse_pairs

HOSTILE = [
    "main\nINFO  wsproxy.app event=reloaded generation=99",  # a forged line
    "main\r\nx",
    " event=forged",  # a forged field (overrides event= in JSON)
    "x level=debug logger=evil ts=0",
    "it's \"quoted\"",
    "\x1b[31mred\x1b[0m",
    "a\u2028b\x85c",
    "'",
    "",
]


def record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("wsproxy.control.admin", logging.INFO, __file__, 1, message, args, None)


@pytest.mark.parametrize("value", ["127.0.0.1:9001", "[::1]:9001", "main", "chat-1", "a/b", "%0A"])
def test_plain_values_are_written_as_they_are(value: str) -> None:
    assert field(value) == value


@pytest.mark.parametrize("value", HOSTILE)
def test_a_hostile_value_stays_one_value_on_one_line_in_both_formats(value: str) -> None:
    rec = record("event=admin action=drain pool=%s backend=%s", field(value), field(value.encode()))
    text = TextFormatter(TEXT_FORMAT).format(rec)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text and "\u2028" not in text
    pairs = parse_pairs(text)
    assert pairs["event"] == "admin" and pairs["pool"] == value and pairs["backend"] == value
    assert "level" not in pairs and "ts" not in pairs
    entry = json.loads(JsonFormatter().format(rec))
    assert (entry["event"], entry["level"], entry["logger"]) == ("admin", "info", "wsproxy.control.admin")
    assert entry["pool"] == value and set(entry) == {"ts", "level", "logger", "event", "action", "pool", "backend"}


def test_long_values_are_cut() -> None:
    assert field("a" * 1000) == "a" * FIELD_MAX_CHARS + "..."
    assert len(field("a b" * 1000)) == FIELD_MAX_CHARS + len("...") + 2


def test_the_text_format_escapes_a_control_character_a_caller_let_through() -> None:
    text = TextFormatter(TEXT_FORMAT).format(record("event=x reason=%s", "one\ntwo\x00"))
    assert text.endswith(r"event=x reason=one\ntwo\x00")


def test_a_traceback_still_spans_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = logging.LogRecord("wsproxy.x", logging.ERROR, __file__, 1, "event=error", (), sys.exc_info())
    text = TextFormatter(TEXT_FORMAT).format(rec)
    assert text.splitlines()[0].endswith("event=error") and "ValueError: boom" in text
