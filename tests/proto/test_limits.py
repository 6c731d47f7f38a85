"""Token buckets, the per-client admission table and message rates, with explicit clocks.

Every ``now`` is stated in the test, so refill arithmetic is checked exactly.
No sockets and no event loop here.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.config.schema import LimitsConfig, RateConfig
from wsproxy.proto.handshake import Rejection
from wsproxy.proto.limits import (
    CLOSE_OTHER,
    CLOSE_SENDER,
    ClientTable,
    MessageRate,
    TokenBucket,
    format_rate,
    parse_rate,
)

IP = "203.0.113.9"


# --- TokenBucket ---------------------------------------------------------------------------


def test_bucket_starts_full_and_empties() -> None:
    bucket = TokenBucket(20, 40)
    assert all(bucket.take(0.0) for _ in range(40))
    assert not bucket.take(0.0)


def test_bucket_refill_arithmetic() -> None:
    bucket = TokenBucket(20, 40)  # one token every 50 ms
    assert bucket.take(10.0, 40)
    assert bucket.tokens(10.0) == 0
    assert bucket.retry_after_s(10.0) == pytest.approx(0.05)
    assert bucket.retry_after_s(10.02) == pytest.approx(0.03)
    assert not bucket.take(10.04)
    assert bucket.take(10.05)
    assert not bucket.take(10.05)
    assert bucket.tokens(10.55) == pytest.approx(10)
    assert bucket.take(10.55, 10)
    assert not bucket.take(10.55)


def test_bucket_never_exceeds_its_burst() -> None:
    bucket = TokenBucket(20, 40)
    assert bucket.take(0.0)
    assert bucket.tokens(1e6) == 40
    assert bucket.full(1e6)
    assert bucket.take(1e6, 40)
    assert not bucket.take(1e6)


def test_bucket_refuses_without_spending() -> None:
    bucket = TokenBucket(1, 5)
    assert bucket.take(0.0, 3)
    assert not bucket.take(0.0, 3)  # 2 left: refused...
    assert bucket.take(0.0, 2)  # ...and still there


def test_bucket_more_than_burst_is_never_possible() -> None:
    bucket = TokenBucket(1000, 10)
    assert not bucket.take(0.0, 11)
    assert not bucket.take(1e9, 11)


def test_bucket_retry_after_is_zero_with_a_token() -> None:
    bucket = TokenBucket(1, 1)
    assert bucket.retry_after_s(0.0) == 0.0
    assert bucket.take(0.0)
    assert bucket.retry_after_s(0.0) == pytest.approx(1.0)
    assert bucket.retry_after_s(0.25) == pytest.approx(0.75)
    assert bucket.retry_after_s(1.0) == 0.0


def test_bucket_float_steps_add_up() -> None:
    """Ten steps of 0.1 s at 10/s are ten tokens, although 0.1 is not exact in binary."""
    bucket = TokenBucket(10, 1)
    now = 0.0
    assert bucket.take(now)
    for _ in range(100):
        now += 0.1
        assert bucket.take(now)


def test_bucket_time_going_backwards_adds_nothing() -> None:
    bucket = TokenBucket(1, 2)
    assert bucket.take(100.0, 2)
    assert not bucket.take(50.0)
    assert not bucket.take(100.5)
    assert bucket.take(101.0)


def test_bucket_reconfigure_keeps_tokens_up_to_the_new_burst() -> None:
    bucket = TokenBucket(1, 10)
    assert bucket.take(0.0, 4)  # 6 left
    bucket.reconfigure(1, 3, 0.0)
    assert bucket.tokens(0.0) == 3
    bucket.reconfigure(100, 50, 0.0)
    assert bucket.tokens(0.0) == 3
    assert bucket.tokens(0.1) == pytest.approx(13)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (1, 0.5)])
def test_bucket_rejects_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


@given(
    rate=st.floats(0.01, 1000),
    burst=st.integers(1, 100),
    steps=st.lists(st.tuples(st.floats(0, 10), st.integers(0, 5)), max_size=50),
)
def test_bucket_never_grants_more_than_rate_allows(
    rate: float, burst: int, steps: list[tuple[float, int]]
) -> None:
    bucket = TokenBucket(rate, burst)
    now, granted = 0.0, 0
    for delta, n in steps:
        now += delta
        if bucket.take(now, n):
            granted += n
        assert 0 <= bucket.tokens(now) <= burst
    assert granted <= burst + rate * now + 1e-6


# --- ClientTable: the order of checks ---------------------------------------------------------

RATE = RateConfig(rate_per_s=20, burst=2)
LIMITS = LimitsConfig(max_connections=100, max_connections_per_ip=2, handshake_rate_per_ip=RATE)


def test_admitted_within_limits() -> None:
    table = ClientTable()
    assert table.admit(IP, 0.0, LIMITS, total_connections=0) is None


def test_process_limit_comes_first() -> None:
    table = ClientTable()
    for _ in range(2):
        assert table.admit(IP, 0.0, LIMITS, 0) is None
        table.connected(IP)
    # over every limit at once: the process limit answers
    verdict = table.admit(IP, 0.0, LIMITS, total_connections=100)
    assert verdict == Rejection(
        503, "connection limit reached: 100 open, max_connections 100", ((b"Retry-After", b"1"),)
    )


def test_per_ip_connections_before_handshake_rate() -> None:
    table = ClientTable()
    for _ in range(2):
        assert table.admit(IP, 0.0, LIMITS, 0) is None
        table.connected(IP)
    verdict = table.admit(IP, 0.0, LIMITS, total_connections=2)
    assert verdict == Rejection(429, f"too many connections from {IP}: 2 open, max_connections_per_ip 2")
    table.disconnected(IP)
    # the refusal spent no token, and the bucket (burst 2) is empty: now the rate answers
    verdict = table.admit(IP, 0.0, LIMITS, total_connections=1)
    assert verdict == Rejection(
        429, f"handshake rate from {IP} above 20/s (burst 2)", ((b"Retry-After", b"1"),)
    )


def test_per_ip_connection_refusal_spends_no_token() -> None:
    limits = LimitsConfig(max_connections_per_ip=1, handshake_rate_per_ip=RateConfig(rate_per_s=1, burst=2))
    table = ClientTable()
    assert table.admit(IP, 0.0, limits, 0) is None
    table.connected(IP)
    for _ in range(5):
        assert table.admit(IP, 0.0, limits, 1) is not None
    table.disconnected(IP)
    assert table.admit(IP, 0.0, limits, 0) is None  # the second token is still there


@pytest.mark.parametrize(
    ("rate", "now", "retry_after"),
    [
        (RateConfig(rate_per_s=20, burst=1), 0.0, b"1"),  # 0.05 s rounds up to 1
        (RateConfig(rate_per_s=1 / 60, burst=1), 0.0, b"60"),  # "1/m"
        (RateConfig(rate_per_s=1 / 60, burst=1), 30.5, b"30"),  # 29.5 s left
        (RateConfig(rate_per_s=1 / 3600, burst=1), 0.0, b"3600"),  # "1/h"
        (RateConfig(rate_per_s=0.4, burst=1), 0.0, b"3"),  # 2.5 s
    ],
)
def test_handshake_rate_retry_after_is_rounded_up(rate: RateConfig, now: float, retry_after: bytes) -> None:
    limits = LimitsConfig(handshake_rate_per_ip=rate)
    table = ClientTable()
    assert table.admit(IP, 0.0, limits, 0) is None
    verdict = table.admit(IP, now, limits, 0)
    assert isinstance(verdict, Rejection)
    assert verdict.status == 429
    assert verdict.headers == ((b"Retry-After", retry_after),)


def test_handshake_rate_refills() -> None:
    table = ClientTable()
    limits = LimitsConfig(handshake_rate_per_ip=RATE)  # 20/s, burst 2
    assert table.admit(IP, 0.0, limits, 0) is None
    assert table.admit(IP, 0.0, limits, 0) is None
    assert table.admit(IP, 0.0, limits, 0) is not None
    assert table.admit(IP, 0.05, limits, 0) is None
    assert table.admit("198.51.100.1", 0.05, limits, 0) is None  # other addresses have their own bucket


def test_no_limits_no_state() -> None:
    table = ClientTable()
    for i in range(100):
        assert table.admit(f"10.0.0.{i}", 0.0, LimitsConfig(), total_connections=10**6) is None
    assert len(table) == 0


def test_zero_means_no_limit() -> None:
    table = ClientTable()
    limits = LimitsConfig(max_connections=0, max_connections_per_ip=0)
    for _ in range(1000):
        table.connected(IP)
    assert table.admit(IP, 0.0, limits, total_connections=10**6) is None


# --- ClientTable: connection counts ---------------------------------------------------------


def test_connection_counts() -> None:
    table = ClientTable()
    table.connected(IP)
    table.connected(IP)
    assert table.connections(IP) == 2
    table.disconnected(IP)
    assert table.connections(IP) == 1
    table.disconnected(IP)
    assert table.connections(IP) == 0
    assert IP not in table  # no bucket, no connections: nothing to remember
    table.disconnected(IP)  # one too many is ignored
    assert table.connections(IP) == 0
    assert len(table) == 0


def test_last_disconnect_keeps_the_bucket() -> None:
    table = ClientTable()
    limits = LimitsConfig(handshake_rate_per_ip=RateConfig(rate_per_s=1, burst=1))
    assert table.admit(IP, 0.0, limits, 0) is None
    table.connected(IP)
    table.disconnected(IP)
    assert IP in table
    assert table.admit(IP, 0.5, limits, 0) is not None  # the rate is remembered across the close


# --- ClientTable: bounded memory ---------------------------------------------------------------


def test_table_stays_bounded_under_a_flood_of_addresses() -> None:
    limits = LimitsConfig(max_connections_per_ip=5, handshake_rate_per_ip=RateConfig(rate_per_s=1 / 60, burst=3))
    table = ClientTable(max_entries=1000)
    live = [f"192.0.2.{i}" for i in range(10)]
    for ip in live:
        assert table.admit(ip, 0.0, limits, 0) is None
        table.connected(ip)
    started = time.perf_counter()
    for i in range(200_000):
        ip = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        # each flood address spends a token, so its entry is never useless and must be evicted
        assert table.admit(ip, i * 1e-4, limits, 0) is None
        if i % 997 == 0:
            assert len(table) <= 1000
    elapsed = time.perf_counter() - started
    assert len(table) <= 1000
    assert elapsed < 10, f"200,000 admissions took {elapsed:.1f} s"
    for ip in live:  # never forgotten: their counts still hold
        assert ip in table
        assert table.connections(ip) == 1
    for ip in live:
        for _ in range(4):
            table.connected(ip)
        verdict = table.admit(ip, 20.0, limits, 0)
        assert isinstance(verdict, Rejection) and verdict.status == 429 and "too many connections" in verdict.reason


def test_least_recently_used_idle_entry_is_evicted_first() -> None:
    limits = LimitsConfig(handshake_rate_per_ip=RateConfig(rate_per_s=1 / 3600, burst=2))
    table = ClientTable(max_entries=3)
    for ip in ("a", "b", "c"):
        assert table.admit(ip, 0.0, limits, 0) is None
    assert table.admit("a", 1.0, limits, 0) is None  # "a" is now the most recently used
    assert table.admit("d", 2.0, limits, 0) is None  # evicts "b"
    assert "b" not in table
    assert {"a", "c", "d"} <= {ip for ip in ("a", "b", "c", "d") if ip in table}
    assert table.admit("a", 3.0, limits, 0) is not None  # "a" kept its empty bucket


def test_table_grows_past_max_entries_only_by_live_addresses() -> None:
    limits = LimitsConfig(handshake_rate_per_ip=RateConfig(rate_per_s=1, burst=10))
    table = ClientTable(max_entries=10)
    for i in range(20):
        table.connected(f"10.0.0.{i}")
    assert len(table) == 20  # all live: none may be forgotten
    assert table.admit("10.1.0.1", 0.0, limits, 0) is None
    assert len(table) == 21  # plus the one being admitted
    assert table.admit("10.1.0.2", 0.0, limits, 0) is None
    assert len(table) == 21  # which the next one evicts
    for i in range(20):
        table.disconnected(f"10.0.0.{i}")
    assert len(table) == 1  # no buckets: the closed addresses are forgotten at once


def test_connected_makes_room_by_evicting_idle_entries() -> None:
    limits = LimitsConfig(handshake_rate_per_ip=RateConfig(rate_per_s=1, burst=10))
    table = ClientTable(max_entries=2)
    assert table.admit("a", 0.0, limits, 0) is None
    assert table.admit("b", 0.0, limits, 0) is None
    table.connected("c")
    assert len(table) == 2 and "a" not in table


def test_idle_entries_expire() -> None:
    limits = LimitsConfig(handshake_rate_per_ip=RateConfig(rate_per_s=1 / 3600, burst=1))
    table = ClientTable(idle_expiry_s=600)
    assert table.admit("a", 0.0, limits, 0) is None
    assert table.admit("a", 599.0, limits, 0) is not None  # still limited (rate 1/h)
    assert table.admit("b", 1000.0, limits, 0) is None  # a refused attempt counts: 401 s is not idle
    assert "a" in table
    assert table.admit("b", 1199.0, limits, 0) is not None
    assert "a" not in table  # swept: 600 s since its last attempt
    assert table.admit("a", 1199.0, limits, 0) is None  # forgiven: a fresh bucket


def test_useless_entries_are_dropped_early() -> None:
    limits = LimitsConfig(handshake_rate_per_ip=RateConfig(rate_per_s=20, burst=40))
    table = ClientTable(idle_expiry_s=600)
    assert table.admit("a", 0.0, limits, 0) is None
    assert table.admit("b", 0.05, limits, 0) is None  # "a" is full again at 0.05: nothing to remember
    assert "a" not in table
    assert "b" in table


def test_expired_entry_not_yet_swept_is_forgiven_too() -> None:
    limits = LimitsConfig(handshake_rate_per_ip=RateConfig(rate_per_s=1 / 3600, burst=1))
    table = ClientTable(idle_expiry_s=600)
    assert table.admit("a", 0.0, limits, 0) is None
    table.connected("a")
    assert table.admit("b", 500.0, limits, 0) is None
    table.disconnected("a")  # "a" goes behind "b" in LRU order, with its last handshake at 0
    assert table.admit("c", 700.0, limits, 0) is None  # the sweep stops at "b" (200 s old)
    assert "a" in table
    assert table.admit("a", 700.0, limits, 0) is None  # 700 s since its last handshake: forgiven


def test_reload_changes_the_bucket() -> None:
    slow = LimitsConfig(handshake_rate_per_ip=RateConfig(rate_per_s=1 / 3600, burst=1))
    fast = LimitsConfig(handshake_rate_per_ip=RateConfig(rate_per_s=100, burst=1))
    table = ClientTable()
    assert table.admit(IP, 0.0, slow, 0) is None
    assert table.admit(IP, 1.0, slow, 0) is not None
    assert table.admit(IP, 1.0, fast, 0) is not None  # no token yet...
    assert table.admit(IP, 1.02, fast, 0) is None  # ...but it refills at the new rate


def test_table_rejects_nonsense_size() -> None:
    with pytest.raises(ValueError):
        ClientTable(max_entries=0)


# --- MessageRate ----------------------------------------------------------------------------------


def test_message_rate() -> None:
    rate = MessageRate(RateConfig(rate_per_s=100, burst=200))
    assert rate.allow(0.0, 150)
    assert rate.allow(0.0, 50)
    assert not rate.allow(0.0, 1)
    assert rate.allow(0.0, 0)  # a chunk that completed no message costs nothing
    assert rate.allow(0.01, 1)
    assert not rate.allow(0.01, 1)
    assert rate.allow(1.01, 100)
    assert rate.reason == "message rate above 100/s (burst 200)"
    assert (CLOSE_SENDER, CLOSE_OTHER) == (1008, 1001)


def test_message_rate_chunk_larger_than_burst() -> None:
    rate = MessageRate(RateConfig(rate_per_s=100, burst=200))
    assert not rate.allow(0.0, 201)


def test_message_rates_are_independent() -> None:
    config = RateConfig(rate_per_s=1, burst=1)
    up, down = MessageRate(config), MessageRate(config)
    assert up.allow(0.0, 1)
    assert not up.allow(0.0, 1)
    assert down.allow(0.0, 1)


# --- parse_rate -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_s"),
    [("20/s", 20.0), ("600/m", 10.0), ("1000/h", 1000 / 3600), ("0.5/s", 0.5), (" 20/s ", 20.0), ("1/h", 1 / 3600)],
)
def test_parse_rate(text: str, per_s: float) -> None:
    assert parse_rate(text) == pytest.approx(per_s)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("20", 'expected a rate like "20/s", "600/m" or "1000/h", got \'20\''),
        ("20/d", "got '20/d'"),
        ("20/S", "got '20/S'"),
        ("20 /s", "got '20 /s'"),
        ("/s", "got '/s'"),
        ("-1/s", "got '-1/s'"),
        ("1e3/s", "got '1e3/s'"),
        ("inf/s", "got 'inf/s'"),
        ("nan/s", "got 'nan/s'"),
        ("20/sec", "got '20/sec'"),
        ("", "got ''"),
        ("0/s", "a rate must be more than zero, got '0/s'"),
        ("0.0/m", "a rate must be more than zero, got '0.0/m'"),
    ],
)
def test_parse_rate_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_rate(text)
    assert message in str(caught.value)


@pytest.mark.parametrize("text", ["20/s", "10/m", "1/h", "0.5/h", "1000/h", "2.5/s"])
def test_format_rate_round_trips(text: str) -> None:
    assert parse_rate(format_rate(parse_rate(text))) == pytest.approx(parse_rate(text))


def test_format_rate_picks_a_readable_unit() -> None:
    assert format_rate(parse_rate("600/m")) == "10/s"
    assert format_rate(parse_rate("30/m")) == "30/m"
    assert format_rate(parse_rate("5/h")) == "5/h"


# --- the default of max_connections (issue 15, item 5) -------------------------------


def test_fd_budget_halves_what_the_reserve_leaves() -> None:
    from wsproxy.proto.limits import fd_budget

    budget = fd_budget(64, backends=2)
    assert (budget.nofile, budget.reserve, budget.max_connections) == (64, 32 + 2 + 2, 14)
    assert fd_budget(1024, backends=1).max_connections == (1024 - 65) // 2
    assert fd_budget(65536).max_connections == (65536 - 32 - 2048) // 2
    assert fd_budget(16).max_connections == 1  # never 0, which would mean "no limit"
