"""The sessions API across workers, decided purely (``wsproxy.supervisor.fanout``): no processes, no event loop.

Covered: worker ids and their owner; a walk over ``next`` with any page size
visits every session of every worker once, in the one id order, with the
filters applied; who did not answer, and the 504 when nobody did; closes
routed to one worker (404 when it has no such session) or summed. During an
upgrade's window: the retiring generation answers as one more worker (its
own merged page, ``fanout.forwarded``), so a walk still visits every session
of both generations once; its silent workers are named ``retiring/SLOT``;
a close goes to whichever generation's worker issued the id.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from wsproxy.control.sessions import CloseOrder, SessionQuery, SessionRecord, parse_query, session_order
from wsproxy.supervisor import fanout
from wsproxy.supervisor.fanout import Ask


def record(conn_id: str, identity: str | None = "alice") -> SessionRecord:
    return SessionRecord(
        id=conn_id, peer="127.0.0.1:5000", identity=identity, route="*/chat", pool="echo", backend="127.0.0.1:9000",
        age_s=1.0, up_bytes=1, down_bytes=2, up_msgs=1, down_msgs=1,
    )  # fmt: skip


def worker_ids(slot: int, count: int, pid: int = 0xAB12) -> list[str]:
    """The ids a worker issues: its prefix and a hex counter (``App.next_conn_id``)."""
    return [f"{fanout.conn_prefix(slot, pid)}{n:x}" for n in range(1, count + 1)]


def generation_answer(workers: dict[int, list[SessionRecord]], question: dict[str, Any]) -> dict[str, Any]:
    """What a retiring supervisor answers a forwarded ``ask`` (``SessionsAcross.answer_newer``), its workers all answering."""
    query = fanout.query_from_message(question["query"])
    ask = Ask(1, frozenset(workers))
    for slot, records in workers.items():
        ask.answered(slot, fanout.worker_page(records, query))
    status, body = fanout.list_answer(ask, query.limit)
    return fanout.forwarded("sessions", status, body)


def walk(
    workers: dict[int, list[SessionRecord]], query_text: str, older: dict[int, list[SessionRecord]] | None = None
) -> list[str]:
    """Follow ``next`` from the first page to the last, as ``wsproxy sessions`` does; every id listed."""
    listed: list[str] = []
    cursor = None
    for _ in range(10_000):
        text = "&".join(filter(None, [query_text, f"cursor={cursor}" if cursor else ""]))
        query = parse_query(text)
        assert isinstance(query, SessionQuery), query
        # the query travels as a message, and back
        travelled = fanout.query_from_message(fanout.query_message(query))
        assert travelled == query
        ask = Ask(1, frozenset(workers) | ({fanout.RETIRING} if older is not None else set()))
        for slot, records in workers.items():
            ask.answered(slot, fanout.worker_page(records, travelled))
        if older is not None:
            ask.answered(fanout.RETIRING, generation_answer(older, {"query": fanout.query_message(travelled)}))
        status, body = fanout.list_answer(ask, query.limit)
        assert status == 200 and body["unanswered"] == []
        listed += [r["id"] for r in body["sessions"]]
        cursor = body["next"]
        if cursor is None:
            return listed
    raise AssertionError("the walk did not end")


def test_ids_name_their_worker() -> None:
    assert fanout.conn_prefix(3, 0xFF) == "w3x0000ff"
    assert fanout.conn_prefix(0, 4194304) == "w0x400000"  # Linux's largest pid still takes six digits
    assert fanout.slot_of("w3x00ff1a") == 3
    assert fanout.owner_of("w3x0000ff1a") == (3, 0xFF) and fanout.owner_of("w3x00f") is None  # too short to name a pid
    assert fanout.slot_of("w12xab120") == 12 and fanout.slot_of("w1x2ab120") == 1  # no slot reads as another
    assert fanout.slot_of("ab121") is None  # a single process's id (4 random hex digits, no w)
    assert fanout.slot_of("wx12") is None and fanout.slot_of("w12") is None


def test_a_walk_lists_every_workers_sessions_once_in_order() -> None:
    workers = {0: [record(i) for i in worker_ids(0, 7)], 1: [record(i) for i in worker_ids(1, 12, 0xFFFF)]}
    everything = sorted((r.id for rs in workers.values() for r in rs), key=session_order)
    for limit in (1, 2, 3, 5, 7, 19, 100):
        assert walk(workers, f"limit={limit}") == everything
    bobs = {0: [record(worker_ids(0, 1)[0], "bob")], 1: [record(i, "bob" if n % 3 else "alice") for n, i in
                                                       enumerate(worker_ids(1, 9))]}
    assert walk(bobs, "identity=bob&limit=2") == sorted(
        (r.id for rs in bobs.values() for r in rs if r.identity == "bob"), key=session_order
    )


@given(
    counts=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=4),
    limit=st.integers(min_value=1, max_value=15),
)
def test_any_page_size_visits_each_session_once(counts: list[int], limit: int) -> None:
    workers = {slot: [record(i) for i in worker_ids(slot, count)] for slot, count in enumerate(counts)}
    listed = walk(workers, f"limit={limit}")
    assert sorted(listed, key=session_order) == listed
    assert sorted(listed) == sorted(r.id for rs in workers.values() for r in rs)


def test_a_page_ends_only_when_no_worker_has_more() -> None:
    full = {"sessions": [record(i).as_json() for i in worker_ids(0, 2)], "more": True}
    assert fanout.merge_pages([full, {"sessions": [], "more": False}], 2)[1] is not None
    page, cursor = fanout.merge_pages([{"sessions": [], "more": False}, {"sessions": [], "more": False}], 2)
    assert (page, cursor) == ([], None)


def test_who_did_not_answer_and_the_504_when_nobody_did() -> None:
    workers = {0: [record(i) for i in worker_ids(0, 3)], 1: [record(i) for i in worker_ids(1, 3)]}
    ask = Ask(7, frozenset({0, 1, 2}))
    ask.answered(1, fanout.worker_page(workers[1], SessionQuery()))
    ask.answered(5, {"sessions": [record("w5x1").as_json()]})  # never asked: ignored
    assert not ask.done and ask.unanswered == [0, 2]
    status, body = fanout.list_answer(ask, 100)
    assert status == 200 and body["unanswered"] == [0, 2]
    assert [r["id"] for r in body["sessions"]] == worker_ids(1, 3)
    ask.gone(2)  # exited: it has nothing left to say
    assert ask.unanswered == [0]

    silent = Ask(8, frozenset({0, 1}))
    status, body = fanout.list_answer(silent, 100, timeout_s=3)
    assert status == 504 and body["unanswered"] == [0, 1] and "3s" in body["error"]
    assert fanout.close_identity_answer(silent)[0] == 504
    nobody = Ask(9, frozenset())  # no worker serves: no sessions, not a timeout
    assert fanout.list_answer(nobody, 100) == (200, {"sessions": [], "next": None, "unanswered": []})


def test_closes_are_routed_or_summed() -> None:
    order = CloseOrder(4000, "bye")
    assert fanout.order_from_message(fanout.order_message(order)) == order
    one = Ask(1, frozenset({1}))
    assert fanout.close_session_answer(one, "w1x1") == (504, {"error": "no worker answered within 3s", "unanswered": [1]})
    one.answered(1, {"closed": 1})
    assert fanout.close_session_answer(one, "w1x1") == (200, {"closed": 1})
    ended = Ask(2, frozenset({1}))
    ended.answered(1, {"closed": None})  # the worker has no such session
    assert fanout.close_session_answer(ended, "w1x1")[0] == 404
    assert fanout.close_session_answer(None, "nope")[0] == 404  # no serving worker owns the id
    gone = Ask(3, frozenset({1}))
    gone.gone(1)
    assert fanout.close_session_answer(gone, "w1x1")[0] == 404

    every = Ask(4, frozenset({0, 1, 2}))
    answers: dict[int, Any] = {0: {"closed": 2}, 1: {"closed": 0}}
    for slot, data in answers.items():
        every.answered(slot, data)
    assert fanout.close_identity_answer(every) == (200, {"closed": 2, "unanswered": [2]})
    every.answered(2, {"closed": 3})
    assert every.done and fanout.close_identity_answer(every) == (200, {"closed": 5, "unanswered": []})


# -- an upgrade's window: the retiring generation asked as one more worker --------------------------


def test_two_live_generations_never_issue_the_same_id() -> None:
    """Same slots, same counters: the pids (distinct while both live) keep the ids apart, and say whose each is."""
    old = {slot: worker_ids(slot, 300, pid) for slot, pid in ((0, 4100), (1, 4101))}
    new = {slot: worker_ids(slot, 300, pid) for slot, pid in ((0, 0x4100), (1, 41))}
    every = [i for ids in (*old.values(), *new.values()) for i in ids]
    assert len(set(every)) == len(every)
    serving = {0: 0x4100, 1: 41}
    assert {fanout.close_route(i, serving, retiring=True) for i in new[0]} == {0}
    assert {fanout.close_route(i, serving, retiring=True) for i in new[1]} == {1}
    assert {fanout.close_route(i, serving, retiring=True) for ids in old.values() for i in ids} == {fanout.RETIRING}
    assert fanout.close_route(old[0][0], serving, retiring=False) is None  # the old generation has exited
    assert fanout.close_route("ab121", serving, retiring=True) is None  # no worker's id at all


@given(
    new=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=3),
    old=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=3),
    limit=st.integers(min_value=1, max_value=15),
)
def test_a_walk_visits_each_session_of_both_generations_once(new: list[int], old: list[int], limit: int) -> None:
    workers = {slot: [record(i) for i in worker_ids(slot, count, 2000 + slot)] for slot, count in enumerate(new)}
    older = {slot: [record(i) for i in worker_ids(slot, count, 1000 + slot)] for slot, count in enumerate(old)}
    listed = walk(workers, f"limit={limit}", older)
    assert sorted(listed, key=session_order) == listed
    assert sorted(listed) == sorted(r.id for rs in (*workers.values(), *older.values()) for r in rs)


def test_the_retiring_generation_is_named_when_it_or_its_workers_do_not_answer() -> None:
    old = [record(i) for i in worker_ids(0, 3, 1000)]
    ask = Ask(1, frozenset({0, 1, fanout.RETIRING}))
    ask.answered(0, {"sessions": [], "more": False})
    assert ask.unanswered == [1, "retiring"] and fanout.list_answer(ask, 10)[0] == 200

    inner = Ask(5, frozenset({0, 1}))  # the old supervisor's own ask: its worker 1 is silent
    inner.answered(0, fanout.worker_page(old, SessionQuery()))
    ask.answered(fanout.RETIRING, fanout.forwarded("sessions", *fanout.list_answer(inner, 10)))
    status, body = fanout.list_answer(ask, 10)
    assert status == 200 and body["unanswered"] == [1, "retiring/1"]
    assert [r["id"] for r in body["sessions"]] == [r.id for r in old]

    silent_old = Ask(6, frozenset({0, 1}))  # none of the old workers answered: the old supervisor says so
    alone = Ask(2, frozenset({fanout.RETIRING}))
    alone.answered(fanout.RETIRING, fanout.forwarded("sessions", *fanout.list_answer(silent_old, 10)))
    assert fanout.list_answer(alone, 10, timeout_s=3) == (
        504, {"error": "no worker answered within 3s", "unanswered": ["retiring/0", "retiring/1"]}
    )
    exited = Ask(3, frozenset({1, fanout.RETIRING}))
    exited.gone(fanout.RETIRING)  # the old generation exited meanwhile: no one to wait for, nothing to name
    assert exited.unanswered == [1] and not exited.done
    exited.answered(1, {"sessions": [], "more": False})
    assert exited.done


def test_closes_reach_the_retiring_generation() -> None:
    order = CloseOrder(4000, "bye")
    conn = worker_ids(1, 1, 1000)[0]
    inner = Ask(1, frozenset({1}))
    inner.answered(1, {"closed": 1})
    kicked = Ask(2, frozenset({fanout.RETIRING}))
    kicked.answered(fanout.RETIRING, fanout.forwarded("close_session", *fanout.close_session_answer(inner, conn)))
    assert fanout.close_session_answer(kicked, conn) == (200, {"closed": 1})
    unknown = Ask(3, frozenset({fanout.RETIRING}))  # the old generation has no such session either
    unknown.answered(fanout.RETIRING, fanout.forwarded("close_session", *fanout.close_session_answer(None, conn)))
    assert fanout.close_session_answer(unknown, conn)[0] == 404
    stuck = Ask(4, frozenset({fanout.RETIRING}))  # its worker did not answer the old supervisor in time
    stuck.answered(fanout.RETIRING, fanout.forwarded("close_session", *fanout.close_session_answer(Ask(9, frozenset({1})), conn)))
    assert fanout.close_session_answer(stuck, conn, timeout_s=3) == (
        504, {"error": "no worker answered within 3s", "unanswered": ["retiring/1"]}
    )
    assert fanout.close_session_answer(Ask(5, frozenset({fanout.RETIRING})), conn)[1]["unanswered"] == ["retiring"]

    every = Ask(6, frozenset({0, 1, fanout.RETIRING}))
    old_every = Ask(7, frozenset({0, 1}))
    old_every.answered(0, {"closed": 2})
    old_every.answered(1, {"closed": 1})
    every.answered(0, {"closed": 1})
    every.answered(fanout.RETIRING, fanout.forwarded("close_identity", *fanout.close_identity_answer(old_every)))
    assert fanout.close_identity_answer(every) == (200, {"closed": 4, "unanswered": [1]})
    assert fanout.order_from_message(fanout.order_message(order)) == order
