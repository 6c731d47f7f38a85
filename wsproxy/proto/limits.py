"""Connection and rate limits: token buckets, the per-client table, and their verdicts. No I/O here.

What is limited (``limits`` in the config), and the reaction each verdict carries:

========================  ==========================  ==========================================
setting                   scope                       over the limit
========================  ==========================  ==========================================
max_connections           the whole process           503 + ``Retry-After: 1``
max_connections_per_ip    one client address          429
handshake_rate_per_ip     one client address          429 + ``Retry-After: <s>`` (token bucket)
max_message_rate          one session, one direction  close 1008 to the sender, 1001 to the other
========================  ==========================  ==========================================

The first three are checked by ``ClientTable.admit`` when a request has been
read, in that order, before anything reaches a backend (RFC 6585 §4 for 429,
RFC 9110 §10.2.3 for Retry-After). The last is ``MessageRate``, which the relay
asks after each chunk. The client address is the one the connection stands
for: the TCP peer, or the source of a PROXY protocol header.

Nothing here reads a clock: every method takes ``now`` (seconds, monotonic,
e.g. ``trio.current_time()``), so tests state time explicitly. Nothing here
counts the process's connections either: the caller passes the total.
This module is not a scheduler and does not delay anything; it only says no.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass

from ..config.schema import LimitsConfig, RateConfig
from .handshake import Rejection

__all__ = [
    "CLOSE_OTHER",
    "CLOSE_SENDER",
    "ClientTable",
    "FdBudget",
    "MessageRate",
    "TokenBucket",
    "fd_budget",
    "format_rate",
    "parse_rate",
]

#: Descriptors kept out of the session budget whatever the fd limit: stdio, the log,
#: epoll, trio's wake-up pipe, listeners and their spares, admin, resolver threads.
FD_RESERVE_BASE = 32


@dataclass(frozen=True, slots=True)
class FdBudget:
    """How many sessions the process's file descriptor limit allows."""

    nofile: int  # the soft RLIMIT_NOFILE
    reserve: int  # descriptors not counted for sessions
    max_connections: int  # (nofile - reserve) // 2: a session holds two (client and backend)


def fd_budget(nofile_soft: int, *, backends: int = 0) -> FdBudget:
    """The default of ``limits.max_connections`` for a soft fd limit of ``nofile_soft``.

    The reserve is ``FD_RESERVE_BASE``, plus one per backend (each may have a
    health check open at any time), plus 1/32 of the limit (admin requests,
    forward-auth subrequests, connections being refused); the rest is halved,
    because each session holds two descriptors. At least 1.
    """
    reserve = FD_RESERVE_BASE + backends + nofile_soft // 32
    return FdBudget(nofile=nofile_soft, reserve=reserve, max_connections=max(1, (nofile_soft - reserve) // 2))

#: RFC 6455 §7.4.1: 1008 "policy violation", sent to the side that sent too fast.
CLOSE_SENDER = 1008
#: RFC 6455 §7.4.1: 1001 "going away", sent to the other side of that session.
CLOSE_OTHER = 1001

#: Float arithmetic may leave 0.9999999 tokens where exact arithmetic gives 1.
_EPSILON = 1e-9


class TokenBucket:
    """A token bucket: holds at most ``burst`` tokens, gains ``rate_per_s`` a second.

    It starts full. ``take`` spends tokens if there are enough and refuses
    otherwise, without spending any. Time that goes backwards adds nothing.
    """

    __slots__ = ("rate_per_s", "burst", "_tokens", "_updated_s")

    def __init__(self, rate_per_s: float, burst: float) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"token bucket rate must be more than 0 per second, got {rate_per_s}")
        if not burst >= 1:
            raise ValueError(f"token bucket burst must be at least 1, got {burst}")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self._tokens = self.burst
        self._updated_s: float | None = None  # None: full, never used

    def tokens(self, now: float) -> float:
        """The tokens available at ``now`` (without spending any)."""
        if self._updated_s is None or now <= self._updated_s:
            return self._tokens
        return min(self.burst, self._tokens + (now - self._updated_s) * self.rate_per_s)

    def take(self, now: float, n: int = 1) -> bool:
        """Spend ``n`` tokens at ``now`` if there are that many; True if spent."""
        tokens = self.tokens(now)
        if self._updated_s is None or now > self._updated_s:
            self._tokens, self._updated_s = tokens, now
        if tokens + _EPSILON < n:
            return False
        self._tokens = max(0.0, tokens - n)
        return True

    def retry_after_s(self, now: float) -> float:
        """Seconds from ``now`` until one token is available (0 if one is)."""
        missing = 1.0 - self.tokens(now)
        return 0.0 if missing <= _EPSILON else missing / self.rate_per_s

    def full(self, now: float) -> bool:
        """Is the bucket full at ``now``? A full bucket can be forgotten: a new one starts full."""
        return self.tokens(now) + _EPSILON >= self.burst

    def reconfigure(self, rate_per_s: float, burst: float, now: float) -> None:
        """Adopt a new rate and size (a config reload), keeping the tokens, up to the new size."""
        if not rate_per_s > 0 or not burst >= 1:
            raise ValueError(f"invalid token bucket: rate {rate_per_s}/s, burst {burst}")
        tokens = self.tokens(now)
        self.rate_per_s, self.burst = float(rate_per_s), float(burst)
        self._tokens = min(tokens, self.burst)
        if self._updated_s is not None:
            self._updated_s = max(self._updated_s, now)


class MessageRate:
    """``limits.max_message_rate`` for one session and one direction.

    The relay calls ``allow(now, messages)`` with the number of messages a
    chunk completed; False means close the sender with ``CLOSE_SENDER`` (1008)
    and the other side with ``CLOSE_OTHER`` (1001), with ``reason``. A chunk
    that completes more messages than the burst is always over the limit.
    """

    __slots__ = ("rate", "_bucket")

    def __init__(self, rate: RateConfig) -> None:
        self.rate = rate
        self._bucket = TokenBucket(rate.rate_per_s, rate.burst)

    def allow(self, now: float, messages: int) -> bool:
        """Spend ``messages`` tokens; True while the sender stays within the rate."""
        return messages <= 0 or self._bucket.take(now, messages)

    @property
    def reason(self) -> str:
        """For the close frame and the log."""
        return f"message rate above {format_rate(self.rate.rate_per_s)} (burst {self.rate.burst})"


@dataclass(slots=True)
class _Client:
    """What the table knows about one client address."""

    connections: int = 0  # live, admitted and counted by connected()
    bucket: TokenBucket | None = None  # handshake_rate_per_ip; None while the limit is off
    seen_s: float = 0.0  # the last admit() for this address


class ClientTable:
    """Per-client-address state for the admission checks: live connections and a handshake bucket.

    Theory of operation
    -------------------

    An address is in one of two maps::

        live   connections > 0       never evicted; admit() finds its count here
        idle   connections == 0      only there for its handshake bucket; LRU order

    ``admit`` creates an idle entry when the handshake rate limit needs a
    bucket; ``connected`` moves an address to ``live`` (creating it if
    needed); the last ``disconnected`` moves it back to ``idle`` if it has a
    bucket, or forgets it, since an entry with no connections and no bucket
    knows nothing a missing entry does not.

    Memory is bounded two ways. Expiry: on every ``admit`` the least recently
    used idle entries are dropped while they are useless (their bucket is full
    again, so a fresh entry would behave the same) or older than
    ``idle_expiry_s`` (then the address is forgiven: its bucket restarts full).
    Capacity: an address that would take the table past ``max_entries`` first
    evicts the least recently used idle entry. So a flood from a million
    addresses costs at most ``max_entries`` entries; the price is that, during
    such a flood, an evicted address's handshake bucket restarts full.

    Live entries are never evicted: forgetting one would lose its connection
    count and let it past ``max_connections_per_ip``. If every entry is live,
    the table grows past ``max_entries``, but only by addresses with open
    connections (plus the one being admitted), and there are at most
    ``max_connections`` of those (or as many as the process has sockets open,
    when that limit is off).
    """

    __slots__ = ("max_entries", "idle_expiry_s", "_live", "_idle")

    def __init__(self, *, max_entries: int = 65536, idle_expiry_s: float = 600) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.max_entries = max_entries
        self.idle_expiry_s = idle_expiry_s
        self._live: dict[str, _Client] = {}
        self._idle: OrderedDict[str, _Client] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._live) + len(self._idle)

    def __contains__(self, ip: object) -> bool:
        return ip in self._live or ip in self._idle

    def connections(self, ip: str) -> int:
        """The live connections counted for ``ip``."""
        client = self._live.get(ip)
        return client.connections if client is not None else 0

    def admit(self, ip: str, now: float, limits: LimitsConfig, total_connections: int) -> Rejection | None:
        """May a new session from ``ip`` start? None, or the refusal to answer with.

        ``total_connections`` is the process's count of live sessions. Checks,
        in order: ``max_connections`` (503, ``Retry-After: 1``),
        ``max_connections_per_ip`` (429), ``handshake_rate_per_ip`` (429,
        ``Retry-After`` in whole seconds, rounded up). Only the last spends
        anything (one token); an admitted session still needs ``connected(ip)``.
        """
        if limits.max_connections and total_connections >= limits.max_connections:
            return Rejection(
                503,
                f"connection limit reached: {total_connections} open, max_connections {limits.max_connections}",
                ((b"Retry-After", b"1"),),
            )
        self._expire(now)
        client = self._live.get(ip)
        if client is None:
            client = self._idle.get(ip)
            if client is not None:
                self._idle.move_to_end(ip)
                if now - client.seen_s >= self.idle_expiry_s:
                    client.bucket = None  # expired but not yet swept: forgiven, as if swept
        per_ip = limits.max_connections_per_ip
        if per_ip and client is not None and client.connections >= per_ip:
            return Rejection(
                429, f"too many connections from {ip}: {client.connections} open, max_connections_per_ip {per_ip}"
            )
        rate = limits.handshake_rate_per_ip
        if rate is None:
            return None
        if client is None:
            client = self._add_idle(ip)
        client.seen_s = now
        bucket = client.bucket
        if bucket is None:
            bucket = client.bucket = TokenBucket(rate.rate_per_s, rate.burst)
        elif (bucket.rate_per_s, bucket.burst) != (rate.rate_per_s, rate.burst):
            bucket.reconfigure(rate.rate_per_s, rate.burst, now)
        if bucket.take(now):
            return None
        wait_s = bucket.retry_after_s(now)
        return Rejection(
            429,
            f"handshake rate from {ip} above {format_rate(rate.rate_per_s)} (burst {rate.burst})",
            ((b"Retry-After", str(max(1, math.ceil(wait_s))).encode("ascii")),),
        )

    def connected(self, ip: str) -> None:
        """Count one more live connection from ``ip`` (after a successful ``admit``)."""
        client = self._live.get(ip)
        if client is None:
            client = self._idle.pop(ip, None)
            if client is None:
                self._evict(room_for=1)
                client = _Client()
            self._live[ip] = client
        client.connections += 1

    def disconnected(self, ip: str) -> None:
        """Count one connection from ``ip`` fewer; an address with no live connection is ignored."""
        client = self._live.get(ip)
        if client is None:
            return
        client.connections -= 1
        if client.connections > 0:
            return
        del self._live[ip]
        if client.bucket is not None:
            self._idle[ip] = client  # most recently used: it just closed

    def _add_idle(self, ip: str) -> _Client:
        self._evict(room_for=1)
        client = self._idle[ip] = _Client()
        return client

    def _evict(self, room_for: int) -> None:
        """Drop least recently used idle entries until ``room_for`` more fit, if idle entries allow."""
        idle = self._idle
        while idle and len(self._live) + len(idle) + room_for > self.max_entries:
            idle.popitem(last=False)

    def _expire(self, now: float) -> None:
        """Drop idle entries from the LRU end while they are useless or too old.

        Each entry is dropped at most once, so this is O(1) per admit on average.
        """
        idle = self._idle
        while idle:
            client = next(iter(idle.values()))
            if now - client.seen_s < self.idle_expiry_s and client.bucket is not None and not client.bucket.full(now):
                return
            idle.popitem(last=False)


_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)/([smh])")
_PER_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(text: str) -> float:
    """A rate in the config ("20/s", "600/m", "1000/h", "0.5/s") → events per second.

    ValueError says what was expected and what was seen.
    """
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'expected a rate like "20/s", "600/m" or "1000/h", got {text!r}')
    count = float(match[1])
    if count <= 0:
        raise ValueError(f"a rate must be more than zero, got {text!r}")
    return count / _PER_UNIT_S[match[2]]


def format_rate(rate_per_s: float) -> str:
    """A rate for messages, in the unit that reads best: 20.0 → "20/s", 1000/3600 → "1000/h"."""
    counts = [(rate_per_s * _PER_UNIT_S[unit], unit) for unit in ("s", "m", "h")]
    for count, unit in counts:  # a whole number in the smallest unit that has one
        if count >= 1 and abs(count - round(count)) <= 1e-9 * count:
            return f"{round(count)}/{unit}"
    count, unit = next(((c, u) for c, u in counts if c >= 1), counts[-1])
    return f"{count:g}/{unit}"
