"""The sessions API's pure rules: query parsing, filters, stable paging, close bodies. No sockets here."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.control.sessions import (
    DEFAULT_CLOSE_CODE,
    DEFAULT_CLOSE_REASON,
    DEFAULT_LIMIT,
    CloseOrder,
    SessionQuery,
    SessionRecord,
    decode_cursor,
    encode_cursor,
    parse_close_body,
    parse_query,
    select,
    session_order,
)

PREFIX = "ab12"


def record(n: int, **changes: object) -> SessionRecord:
    values: dict[str, object] = {
        "id": f"{PREFIX}{n:x}",
        "peer": f"192.0.2.{n % 3}:{40000 + n}",
        "identity": ["alice", "bob", None][n % 3],
        "route": "*/chat" if n % 2 else "*/",
        "pool": "chat" if n % 2 else "echo",
        "backend": f"10.0.0.{n % 4}:9000",
        "age_s": float(n),
        "up_bytes": n,
        "down_bytes": 2 * n,
        "up_msgs": 1,
        "down_msgs": 1,
    }
    values.update(changes)
    return SessionRecord(**values)  # type: ignore[arg-type]


def test_ids_order_by_length_then_text_as_the_counter_grows() -> None:
    ids = [f"{PREFIX}{n:x}" for n in range(1, 300)]
    assert sorted(ids, key=session_order) == ids


def test_defaults_and_every_filter() -> None:
    assert parse_query("") == SessionQuery()
    assert SessionQuery().limit == DEFAULT_LIMIT
    query = parse_query("route=%2A%2Fchat&pool=chat&backend=10.0.0.1:9000&identity=alice&peer=192.0.2.1&limit=7")
    assert query == SessionQuery(
        route="*/chat", pool="chat", backend="10.0.0.1:9000", identity="alice", peer="192.0.2.1", limit=7
    )
    records = [record(n) for n in range(1, 40)]
    page, cursor = select(records, SessionQuery(identity="alice", limit=1000))
    assert {r.identity for r in page} == {"alice"} and cursor is None
    assert all(r.route == "*/chat" for r in select(records, SessionQuery(route="*/chat", limit=1000))[0])
    assert [r.peer for r in select(records, SessionQuery(peer="192.0.2.1:40004"))[0]] == ["192.0.2.1:40004"]
    assert len(select(records, SessionQuery(peer="192.0.2.1", limit=1000))[0]) == 13  # the address alone
    v6 = [record(1, peer="[2001:db8::1]:5000")]
    assert select(v6, SessionQuery(peer="2001:db8::1"))[0] == v6
    assert select(v6, SessionQuery(peer="[2001:db8::1]"))[0] == v6
    assert select(v6, SessionQuery(peer="2001:db8::"))[0] == []


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("limit=0", "limit must be"),
        ("limit=1001", "limit must be"),
        ("limit=-1", "limit must be"),
        ("limit=%C2%B2", "limit must be"),  # a superscript two is a digit to str.isdigit
        ("limit=", "limit must be"),
        ("cursor=", "invalid cursor"),
        ("cursor=bm9wZQ", "invalid cursor"),  # base64 of "nope": no version prefix
        ("cursor=%%%", "invalid cursor"),
        ("identity=a&identity=b", "given twice"),
        ("who=alice", "unknown query parameter 'who'"),
        ("identity=%0Aevent%3Dx", "control character"),
        ("identity=%FF", "malformed"),
        ("a&&b", "malformed"),
    ],
)
def test_bad_queries_are_refused_with_a_reason(query: str, error: str) -> None:
    verdict = parse_query(query)
    assert isinstance(verdict, str) and error in verdict, verdict


def test_paging_visits_every_match_once_while_sessions_come_and_go() -> None:
    live = {n: record(n) for n in range(1, 26)}
    seen: list[str] = []
    cursor: str | None = None
    step = 0
    while True:
        query = parse_query(f"identity=alice&limit=3{'&cursor=' + cursor if cursor else ''}")
        assert isinstance(query, SessionQuery)
        page, cursor = select(live.values(), query)
        seen += [r.id for r in page]
        step += 1
        live.pop(step * 2, None)  # sessions end between pages...
        live[100 + step] = record(100 + step)  # ...and new ones open
        if cursor is None:
            break
    assert len(seen) == len(set(seen)), "a session listed twice"
    assert seen == sorted(seen, key=session_order)
    alive_alice = {r.id for r in live.values() if r.identity == "alice"}
    assert alive_alice - set(seen) <= {f"{PREFIX}{n:x}" for n in range(100, 100 + step + 1)}  # only latecomers missed


def test_the_last_page_has_no_cursor_and_a_full_one_does() -> None:
    records = [record(n) for n in range(1, 5)]
    assert select(records, SessionQuery(limit=4))[1] is None
    page, cursor = select(records, SessionQuery(limit=3))
    assert cursor is not None and decode_cursor(cursor) == page[-1].id
    assert select(records, SessionQuery(limit=3, after=decode_cursor(cursor)))[0] == records[3:]


@given(st.text(alphabet="0123456789abcdef", min_size=1, max_size=20))
def test_cursors_round_trip_and_are_opaque_url_safe(conn_id: str) -> None:
    cursor = encode_cursor(conn_id)
    assert all(c.isalnum() or c in "-_" for c in cursor)
    assert decode_cursor(cursor) == conn_id


def test_close_body_defaults_and_valid_codes() -> None:
    assert parse_close_body(b"") == parse_close_body(b"  \n") == CloseOrder(DEFAULT_CLOSE_CODE, DEFAULT_CLOSE_REASON)
    assert parse_close_body(b"{}") == CloseOrder(1008, DEFAULT_CLOSE_REASON)
    for code in (1000, 1001, 1008, 1011, 1012, 1013, 4000, 4999):
        assert parse_close_body(json.dumps({"code": code}).encode()) == CloseOrder(code, DEFAULT_CLOSE_REASON)
    assert parse_close_body(json.dumps({"reason": ""}).encode()) == CloseOrder(1008, "")
    assert parse_close_body(json.dumps({"reason": "€" * 41}).encode()) == CloseOrder(1008, "€" * 41)  # 123 bytes


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"nope", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[]", "JSON object"),
        (b'"x"', "JSON object"),
        (b'{"code": 1002}', "not one a proxy may send"),  # the peers' own codes
        (b'{"code": 1005}', "not one a proxy may send"),  # never on the wire
        (b'{"code": 1006}', "not one a proxy may send"),
        (b'{"code": 1015}', "not one a proxy may send"),
        (b'{"code": 3000}', "not one a proxy may send"),  # IANA-registered, not ours
        (b'{"code": 3999}', "not one a proxy may send"),
        (b'{"code": 5000}', "not one a proxy may send"),
        (b'{"code": 1008.0}', "not one a proxy may send"),
        (b'{"code": true}', "not one a proxy may send"),
        (b'{"code": null}', "not one a proxy may send"),
        (b'{"reason": null}', "must be a string"),
        ('{"reason": "%s"}' % ("€" * 42), "126 bytes"),
        (b'{"reason": "\\ud800"}', "not valid UTF-8"),
        (b'{"code": 1000, "extra": 1}', "unknown key 'extra'"),
    ],
)
def test_bad_close_bodies_are_refused_with_a_reason(body: bytes | str, error: str) -> None:
    verdict = parse_close_body(body.encode() if isinstance(body, str) else body)
    assert isinstance(verdict, str) and error in verdict, verdict
