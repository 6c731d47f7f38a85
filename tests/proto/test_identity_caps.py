"""The per-identity session table: counting, refusing, evicting the oldest. No sockets, no event loop."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wsproxy.proto.handshake import Rejection
from wsproxy.proto.identity_caps import RETRY_AFTER_S, Evict, IdentityKey, IdentityTable

ALICE = IdentityKey("id:alice")
BOB = IdentityKey("id:bob")


def open_(table: IdentityTable, identity: IdentityKey, conn: str, limit: int = 2, policy: str = "refuse") -> object:
    verdict = table.admit(identity, conn, limit=limit, policy=policy, label="alice")
    if not isinstance(verdict, Rejection):
        table.established(identity, conn)
    return verdict


def test_refuse_beyond_the_cap_with_429_and_retry_after() -> None:
    table = IdentityTable()
    assert open_(table, ALICE, "c1") is None
    assert open_(table, ALICE, "c2") is None
    verdict = table.admit(ALICE, "c3", limit=2, policy="refuse", label="identity 'alice'")
    assert isinstance(verdict, Rejection)
    assert verdict.status == 429
    assert verdict.headers == ((b"Retry-After", b"%d" % RETRY_AFTER_S),)
    assert verdict.reason == "too many sessions for identity 'alice': 2 open, max_sessions_per_identity 2"
    assert table.count(ALICE) == 2  # the refused one was not counted
    assert open_(table, BOB, "c4") is None  # another identity has its own count
    table.release(ALICE, "c1")
    assert open_(table, ALICE, "c3") is None


def test_pending_handshakes_count_so_concurrent_ones_cannot_slip_past() -> None:
    table = IdentityTable()
    assert table.admit(ALICE, "c1", limit=2, policy="refuse", label="a") is None
    assert table.admit(ALICE, "c2", limit=2, policy="refuse", label="a") is None
    assert isinstance(table.admit(ALICE, "c3", limit=2, policy="refuse", label="a"), Rejection)


def test_close_oldest_names_the_oldest_open_session_and_admits() -> None:
    table = IdentityTable()
    for conn in ("c1", "c2"):
        open_(table, ALICE, conn, policy="close_oldest")
    assert table.admit(ALICE, "c3", limit=2, policy="close_oldest", label="a") == Evict(("c1",))
    assert table.count(ALICE) == 2  # c2 and c3: c1 is closing and no longer counts
    table.established(ALICE, "c3")
    assert table.admit(ALICE, "c4", limit=2, policy="close_oldest", label="a") == Evict(("c2",))
    table.release(ALICE, "c1")  # the evicted session's end changes nothing more
    assert table.count(ALICE) == 2


def test_close_oldest_never_evicts_a_session_still_in_its_handshake() -> None:
    table = IdentityTable()
    table.admit(ALICE, "c1", limit=1, policy="close_oldest", label="a")  # pending: nothing to close yet
    verdict = table.admit(ALICE, "c2", limit=1, policy="close_oldest", label="a")
    assert isinstance(verdict, Rejection) and verdict.status == 429


def test_a_lowered_cap_evicts_as_many_as_needed() -> None:
    table = IdentityTable()
    for conn in ("c1", "c2", "c3", "c4"):
        open_(table, ALICE, conn, limit=10)
    assert table.admit(ALICE, "c5", limit=2, policy="close_oldest", label="a") == Evict(("c1", "c2", "c3"))


def test_no_cap_counts_without_refusing_and_release_forgets_the_identity() -> None:
    table = IdentityTable()
    for n in range(50):
        assert table.admit(ALICE, f"c{n}", limit=0, policy="refuse", label="a") is None
    assert table.count(ALICE) == 50 and len(table) == 1
    for n in range(50):
        table.release(ALICE, f"c{n}")
    assert len(table) == 0
    table.release(ALICE, "never")  # unknown: ignored
    assert len(table) == 0


def test_a_refusal_leaves_no_empty_entry() -> None:
    table = IdentityTable()
    open_(table, ALICE, "c1", limit=1)
    table.release(ALICE, "c1")
    assert len(table) == 0


@given(
    st.lists(
        st.tuples(st.sampled_from(["admit", "establish", "release"]), st.integers(0, 2), st.integers(0, 7)),
        max_size=80,
    ),
    st.integers(1, 3),
    st.sampled_from(["refuse", "close_oldest"]),
)
def test_the_count_never_exceeds_the_cap_and_empties(ops: list[tuple[str, int, int]], limit: int, policy: str) -> None:
    table = IdentityTable()
    identities = [IdentityKey(f"id:{n}") for n in range(3)]
    live: dict[str, IdentityKey] = {}
    for op, who, conn_n in ops:
        identity, conn = identities[who], f"{who}-{conn_n}"
        if op == "admit" and conn not in live:
            verdict = table.admit(identity, conn, limit=limit, policy=policy, label="x")
            if not isinstance(verdict, Rejection):
                live[conn] = identity
        elif op == "establish" and conn in live:
            table.established(identity, conn)
        elif op == "release" and conn in live:
            table.release(live.pop(conn), conn)
        for i in identities:
            assert table.count(i) <= limit
    for conn, identity in live.items():
        table.release(identity, conn)
    assert len(table) == 0
