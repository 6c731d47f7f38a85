"""The README's table "Once the session is established", row by row, on real relays and trio's virtual clock.

Each case plays both peers raw over socket pairs (``tests.kit.relayed``), with
both relay drivers (the epoll engine and the trio pumps), and checks what the
README promises: the close code and reason each side receives (or that its
TCP connection closes without a close frame), when TCP closes, and what the
session's ``close`` line and ``wsproxy_sessions_closed_total`` get from the
relay (``outcome``, ``by``, ``reason``, the proxy's own close codes).

The peers are well behaved unless a case says otherwise: each answers pings
and answers a close frame with the same code and reason; the backend, being the
WebSocket server, closes TCP once its close handshake is complete (RFC 6455
§7.1.1). So a session whose ending the proxy handles right ends at once, not
at its close deadline.

The table's rows are read from README.md: a row with no case here (nor a
reason for having none) fails the test, and so does a case whose row is gone.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.kit.relayed import DRIVERS, FAILURE_CODE, Behaviour, Relayed, Seen, answer, relayed, session_for
from tests.kit.servers import make_config
from tests.kit.wait import until
from tests.kit.ws import OP_BINARY, OP_CLOSE, OP_TEXT, frame, frame_header
from wsproxy.app import Generation
from wsproxy.balance.registry import Registry
from wsproxy.config.schema import (
    Config,
    DrainConfig,
    KeepaliveConfig,
    LimitsConfig,
    PoolName,
    RateConfig,
    RouteConfig,
    TimeoutsConfig,
)
from wsproxy.control import lifetime
from wsproxy.control.drain import Drainer, close_spread
from wsproxy.control.session_admin import SessionControl
from wsproxy.control.sessions import CloseOrder
from wsproxy.control.sweeper import idle_sweeper
from wsproxy.proto.identity_caps import IdentityKey
from wsproxy.proto.relay import By, Outcome

README = Path(__file__).resolve().parents[2] / "README.md"
CLOSE_TIMEOUT_S = 3.0
MAX_MESSAGE_BYTES = 100
RATE = RateConfig(rate_per_s=1.0, burst=2)
IDLE_S = 8.0  # the sweeper then looks every second
KEEPALIVE = KeepaliveConfig(interval_s=2.0, timeout_s=1.0)  # the sweeper then looks every 0.25 s
AGE_S = 20.0  # routes[].max_session_age: the sweeper then looks every 0.4 s
DRAIN = DrainConfig(timeout_s=2.0, spread_s=0.0, close_timeout_s=CLOSE_TIMEOUT_S)


# -- the scene --------------------------------------------------------------------------------


@dataclass
class Scene:
    """A case's relay, the peers' observations, and where control tasks run."""

    r: Relayed
    nursery: trio.Nursery
    client: Seen = field(default_factory=Seen)
    backend: Seen = field(default_factory=Seen)

    async def client_close(self, code: int, reason: str = "") -> None:
        self.client.sent_close = True
        await self.r.client.send_close(code, reason)

    async def backend_close(self, code: int, reason: str = "") -> None:
        self.backend.sent_close = True
        await self.r.backend.send_close(code, reason)
        # a server that started the handshake closes TCP once the client answered (kit's answer)


# -- the cases ---------------------------------------------------------------------------------

#: A close frame's expectation: (code, reason) or (code, the reason's start + "..."); NO_CLOSE: TCP closes without one.
Expect = tuple[int, str] | None
NO_CLOSE: Expect = None


@dataclass(frozen=True)
class Ending:
    row: str  # how the README row's situation starts
    name: str
    act: Callable[[Scene], Awaitable[None]]
    to_client: Expect
    to_backend: Expect
    kind: Outcome
    by: By
    reason: str  # the close line's reason (a trailing "..." matches a prefix)
    proxy_to_client: int | None = None  # the proxy's own close code to each side (metrics: sent_by="proxy")
    proxy_to_backend: int | None = None
    ends_within: tuple[float, float] = (0.0, 0.0)  # virtual seconds from the act's end to the relay's end
    client: Behaviour = Behaviour()
    backend: Behaviour = Behaviour()
    options: dict[str, object] = field(default_factory=dict)


def text_frame_start(payload_len: int) -> bytes:
    return frame_header(OP_TEXT, payload_len, mask=b"\x00\x00\x00\x00")  # a masked header, key 0: payload as is


async def client_closes(s: Scene) -> None:
    await s.client_close(1000, "bye")


async def backend_closes(s: Scene) -> None:
    await s.backend_close(1001, "restarting")


async def client_bad_close_payload(s: Scene) -> None:
    await s.r.client.send_frame(OP_CLOSE, b"\x03")  # §5.5.1: a body is at least the 2-byte code


async def backend_close_code_1005(s: Scene) -> None:
    await s.r.backend.send_frame(OP_CLOSE, b"\x03\xed")  # §7.4.1: 1005 must not be sent on the wire


async def client_too_big(s: Scene) -> None:
    await s.r.client.send_frame(OP_TEXT, b"x" * (MAX_MESSAGE_BYTES + 50))


async def client_too_big_across_fragments(s: Scene) -> None:
    await s.r.client.send_frame(OP_TEXT, b"a" * 60, fin=False)
    await until(lambda: len(s.backend.frames) == 1, what="the first fragment relayed")
    await s.r.client.send_frame(0x0, b"b" * 60)  # the continuation takes the message over 100 bytes


async def backend_too_big(s: Scene) -> None:
    await s.r.backend.send_frame(OP_BINARY, b"x" * (MAX_MESSAGE_BYTES + 50))


async def client_unmasked(s: Scene) -> None:
    await s.r.client.send(b"\x81\x02hi")  # RFC 6455 §5.1: a client MUST mask


async def backend_masked(s: Scene) -> None:
    await s.r.backend.send(b"\x81\x82\x00\x00\x00\x00hi")  # §5.1: a server MUST NOT mask


async def client_reserved_opcode(s: Scene) -> None:
    await s.r.client.send_frame(0x3, b"?")


async def client_bad_utf8(s: Scene) -> None:
    await s.r.client.send_frame(OP_TEXT, b"caf\xc3")  # a code point cut at the message's end


async def backend_bad_utf8(s: Scene) -> None:
    await s.r.backend.send_frame(OP_TEXT, b"\xff")


async def client_bad_utf8_inside_long_frame(s: Scene) -> None:
    start = text_frame_start(1000) + b"a valid start"
    await s.r.client.send(start)
    await until(lambda: s.r.relay.bytes_up == len(start), what="the frame's valid start forwarded")
    await s.r.client.send(b"\xff" + b"x" * 986)


async def backend_bad_utf8_inside_long_frame(s: Scene) -> None:
    start = frame_header(OP_TEXT, 1000) + b"a valid start"
    await s.r.backend.send(start)
    await until(lambda: s.r.relay.bytes_down == len(start), what="the frame's valid start forwarded")
    await s.r.backend.send(b"\xff" + b"x" * 986)


async def backend_gone(s: Scene) -> None:
    await s.r.backend.send_frame(OP_TEXT, b"last words")
    s.r.backend.close()


async def backend_gone_mid_frame(s: Scene) -> None:
    start = frame_header(OP_BINARY, 100) + b"0123456789"
    await s.r.backend.send(start)
    await until(lambda: s.r.relay.bytes_down == len(start), what="the frame's start forwarded")
    s.r.backend.close()


async def client_gone(s: Scene) -> None:
    await s.r.client.send_frame(OP_TEXT, b"last words")
    s.r.client.close()


async def client_gone_mid_frame(s: Scene) -> None:
    start = text_frame_start(100) + b"0123456789"
    await s.r.client.send(start)
    await until(lambda: s.r.relay.bytes_up == len(start), what="the frame's start forwarded")
    s.r.client.close()


def burst(is_client: bool) -> bytes:
    return b"".join(frame(OP_TEXT, b"m%d" % n, mask=is_client) for n in range(RATE.burst + 2))


async def client_over_rate(s: Scene) -> None:
    await s.r.client.send(burst(True))


async def backend_over_rate(s: Scene) -> None:
    await s.r.backend.send(burst(False))


def config_with(idle_s: float = IDLE_S, **route: object) -> Config:
    """The one-route config of these cases; ``route`` are RouteConfig fields (keepalive, max_session_age_s)."""
    routes = (RouteConfig(pool=PoolName("main"), **route),)  # type: ignore[arg-type]
    config = make_config([9], routes=routes, timeouts=TimeoutsConfig(idle_s=idle_s))
    pool = dataclasses.replace(config.pools[PoolName("main")], drain=DRAIN)
    return dataclasses.replace(config, pools={pool.name: pool})


def sweeping(config: Config) -> Callable[[Scene], Awaitable[None]]:
    """Run the app's sweeper over the session (idle timeouts, keepalive ticks)."""

    async def act(s: Scene) -> None:
        session = session_for(s.r.relay, Generation(config, 1))
        s.nursery.start_soon(idle_sweeper, {session.conn_id: session}, lambda: config)

    return act


async def keep_talking(s: Scene, until_s: float) -> None:
    """The client sends a message every 0.5 s (so the session is never idle)."""
    while trio.current_time() < until_s and not s.r.ended.is_set():
        try:
            await s.r.client.send_frame(OP_TEXT, b"tick")
        except (trio.BrokenResourceError, OSError):
            return
        await trio.sleep(0.5)


async def admin_drain(s: Scene) -> None:
    config = config_with()
    sessions = {"c1": session_for(s.r.relay, Generation(config, 1))}
    drainer = Drainer(Registry(), sessions, lambda: config.pools, random.Random(1))
    drainer.nursery = s.nursery
    assert drainer.drain_backend("main", "127.0.0.1:9")


async def drain_while_the_backend_is_mid_frame(s: Scene) -> None:
    """The client's close goes after the frame in flight; the backend (answering by hand) finishes it, then closes."""
    start = frame_header(OP_BINARY, 100) + b"0123456789"
    await s.r.backend.send(start)
    await until(lambda: s.r.relay.bytes_down == len(start), what="the frame's start forwarded")
    await admin_drain(s)
    await until(lambda: s.backend.close is not None, timeout_s=DRAIN.timeout_s + 1, what="the backend's 1001")
    assert s.client.close is None  # not inside the frame
    await s.r.backend.send(b"x" * 90)
    await s.r.backend.send_close(1001, "bye")
    s.r.backend.shutdown_write()


async def removed_by_reload(s: Scene) -> None:
    config = config_with()
    session = session_for(s.r.relay, Generation(config, 1))
    assert session.backend is not None
    pool = config.pools[PoolName("main")]
    after = dataclasses.replace(pool, backends=())  # the reload (or the DNS answer) took it out
    drainer = Drainer(Registry(), {"c1": session}, lambda: {pool.name: after}, random.Random(1))
    drainer.nursery = s.nursery
    drainer.drain_removed([(pool.name, session.backend.address, pool.drain)])


async def operator_closes(s: Scene) -> None:
    """``POST /sessions/ID/close`` with no body: what the admin API calls."""
    session = session_for(s.r.relay, Generation(config_with(), 1))
    assert SessionControl({"c1": session}).close_session("c1", CloseOrder(), by="127.0.0.1:1") == 1


async def identity_over_its_cap(s: Scene) -> None:
    """A second session of the same identity under ``max_sessions_per_identity: 1``, ``close_oldest``."""
    limits = LimitsConfig(max_sessions_per_identity=1, on_identity_limit="close_oldest")
    generation = Generation(config_with(), 1)
    oldest = session_for(s.r.relay, generation, conn_id="oldest")
    control = SessionControl({"oldest": oldest})
    identity = (IdentityKey("alice"), "alice")
    assert control.admit(oldest, identity, limits) is None
    control.established(oldest)
    assert control.admit(session_for(None, generation, conn_id="newest"), identity, limits) is None


def aging(config: Config) -> Callable[[Scene], Awaitable[None]]:
    """The session's age deadline set as ``edge.session`` sets it at the 101, then met by the sweeper."""

    async def act(s: Scene) -> None:
        session = session_for(s.r.relay, Generation(config, 1))
        assert session.route is not None
        lifetime.established(session, session.route, trio.current_time(), random.Random(1))
        s.nursery.start_soon(idle_sweeper, {session.conn_id: session}, lambda: config)

    return act


async def shutdown(s: Scene) -> None:
    """What ``App.shutdown`` starts: ``close_spread`` over the open sessions with 1001 both ways."""
    session = session_for(s.r.relay, Generation(config_with(), 1))
    await close_spread(
        [session], 0.0, 1001, 1001, "proxy shutting down", Outcome.SHUTDOWN,
        live={"c1": session}, rng=random.Random(1),
    )  # fmt: skip


ROW_CLOSE = "a close frame from either side"
ROW_TOO_BIG = "a message over `limits.max_message_bytes`"
ROW_PROTOCOL = "a protocol violation"
ROW_UTF8 = "invalid UTF-8 in a text message"
ROW_UTF8_INSIDE = "...the same, found inside a long frame"
ROW_BACKEND_EOF = "the backend's TCP connection ends without a close frame"
ROW_CLIENT_EOF = "the client's TCP connection ends without a close frame"
ROW_RATE = "more messages than `limits.max_message_rate`"
ROW_IDLE = "no byte relayed in either direction for `timeouts.idle`"
ROW_KEEPALIVE = "a keepalive ping not answered in time"
ROW_DRAIN = "the backend drains"
ROW_REMOVED = "the backend left the pool's DNS answer"
ROW_OPERATOR = "an operator closes it"
ROW_IDENTITY = "a new session of the same identity"
ROW_AGE = "`routes[].max_session_age` reached"
ROW_SHUTDOWN = "shutdown (SIGTERM/SIGINT)"

too_big: dict[str, object] = {"max_message_bytes": MAX_MESSAGE_BYTES}
big_reason = f"sent a message of more than {MAX_MESSAGE_BYTES} bytes (at least {MAX_MESSAGE_BYTES + 50})"
rate: dict[str, object] = {"message_rate": RATE}
rate_reason = "message rate above 1/s (burst 2)"
F = FAILURE_CODE

CASES = [
    Ending(ROW_CLOSE, "client closes first", client_closes, (1000, "bye"), (1000, "bye"), Outcome.NORMAL, By.CLIENT, "close"),
    Ending(ROW_CLOSE, "backend closes first", backend_closes, (1001, "restarting"), (1001, "restarting"), Outcome.NORMAL, By.BACKEND, "close"),
    Ending(
        ROW_CLOSE, "the backend never answers: TCP closes at the close timeout", client_closes,
        NO_CLOSE, (1000, "bye"), Outcome.NORMAL, By.CLIENT, "close",
        ends_within=(CLOSE_TIMEOUT_S, CLOSE_TIMEOUT_S), backend=Behaviour(answer_close=False),
    ),
    Ending(
        ROW_CLOSE, "the backend closes TCP a while after the handshake: the proxy waits for it (RFC 6455 7.1.1)", client_closes,
        (1000, "bye"), (1000, "bye"), Outcome.NORMAL, By.CLIENT, "close",
        ends_within=(1.5, 1.5), backend=Behaviour(close_tcp_after_s=1.5),
    ),
    Ending(
        ROW_TOO_BIG, "from the client", client_too_big, (1009, "message of more than 100 bytes (at least 150)"),
        (1001, "peer sent a message too big"), Outcome.TOO_BIG, By.PROXY, "client " + big_reason, 1009, 1001, options=too_big,
    ),
    Ending(
        ROW_TOO_BIG, "from the client, across fragments", client_too_big_across_fragments,
        (1009, "message of more than 100 bytes (at least 120)"), (1001, "peer sent a message too big"), Outcome.TOO_BIG,
        By.PROXY, "client sent a message of more than 100 bytes (at least 120)", 1009, 1001, options=too_big,
    ),
    Ending(
        ROW_TOO_BIG, "from the backend", backend_too_big, (F, "backend " + big_reason),
        (1009, "message of more than 100 bytes (at least 150)"), Outcome.TOO_BIG, By.PROXY, "backend " + big_reason, F, 1009,
        options=too_big,
    ),
    Ending(
        ROW_PROTOCOL, "an unmasked client frame", client_unmasked, (1002, "..."), (1001, "peer protocol error"),
        Outcome.PROTOCOL_ERROR, By.PROXY, "client protocol error: ...", 1002, 1001,
    ),
    Ending(
        ROW_PROTOCOL, "a reserved opcode from the client", client_reserved_opcode, (1002, "..."), (1001, "peer protocol error"),
        Outcome.PROTOCOL_ERROR, By.PROXY, "client protocol error: ...", 1002, 1001,
    ),
    Ending(
        ROW_PROTOCOL, "a 1-byte close payload from the client", client_bad_close_payload, (1002, "..."),
        (1001, "peer protocol error"), Outcome.PROTOCOL_ERROR, By.PROXY, "client protocol error: ...", 1002, 1001,
    ),
    Ending(
        ROW_PROTOCOL, "close code 1005 on the wire from the backend", backend_close_code_1005,
        (F, "backend protocol error: ..."), (1002, "..."), Outcome.PROTOCOL_ERROR, By.PROXY, "backend protocol error: ...",
        F, 1002,
    ),
    Ending(
        ROW_PROTOCOL, "a masked server frame", backend_masked, (F, "backend protocol error: ..."), (1002, "..."),
        Outcome.PROTOCOL_ERROR, By.PROXY, "backend protocol error: ...", F, 1002,
    ),
    Ending(
        ROW_UTF8, "from the client", client_bad_utf8, (1007, "..."), (1001, "peer protocol error"),
        Outcome.INVALID_DATA, By.PROXY, "client protocol error: ...", 1007, 1001,
    ),
    Ending(
        ROW_UTF8, "from the backend", backend_bad_utf8, (F, "backend protocol error: ..."), (1007, "..."),
        Outcome.INVALID_DATA, By.PROXY, "backend protocol error: ...", F, 1007,
    ),
    Ending(
        ROW_UTF8_INSIDE, "from the client", client_bad_utf8_inside_long_frame, (1007, "..."), NO_CLOSE,
        Outcome.INVALID_DATA, By.PROXY, "client protocol error: ...", 1007, None,
    ),
    Ending(
        ROW_UTF8_INSIDE, "from the backend", backend_bad_utf8_inside_long_frame, NO_CLOSE, (1007, "..."),
        Outcome.INVALID_DATA, By.PROXY, "backend protocol error: ...", None, 1007,
    ),
    Ending(
        ROW_BACKEND_EOF, "between frames", backend_gone, (F, "backend went away"), NO_CLOSE,
        Outcome.BACKEND_GONE, By.BACKEND, "backend vanished", F, None,
    ),
    Ending(
        ROW_BACKEND_EOF, "in the middle of a frame: the client's TCP closes without a close frame", backend_gone_mid_frame,
        NO_CLOSE, NO_CLOSE, Outcome.BACKEND_GONE, By.BACKEND, "backend vanished",
    ),
    Ending(
        ROW_CLIENT_EOF, "between frames", client_gone, NO_CLOSE, (1001, "client went away"),
        Outcome.CLIENT_GONE, By.CLIENT, "client vanished", None, 1001,
    ),
    Ending(
        ROW_CLIENT_EOF, "in the middle of a frame: the backend's TCP closes without a close frame", client_gone_mid_frame,
        NO_CLOSE, NO_CLOSE, Outcome.CLIENT_GONE, By.CLIENT, "client vanished",
    ),
    Ending(
        ROW_RATE, "from the client", client_over_rate, (1008, rate_reason), (1001, "peer policy violation"),
        Outcome.RATE_LIMITED, By.PROXY, "client " + rate_reason, 1008, 1001, options=rate,
    ),
    Ending(
        ROW_RATE, "from the backend", backend_over_rate, (F, "backend " + rate_reason), (1008, rate_reason),
        Outcome.RATE_LIMITED, By.PROXY, "backend " + rate_reason, F, 1008, options=rate,
    ),
    Ending(
        ROW_IDLE, "the sweeper closes it", sweeping(config_with()), (1001, "idle timeout"), (1001, "idle timeout"),
        Outcome.IDLE, By.PROXY, "idle timeout", 1001, 1001, ends_within=(IDLE_S, IDLE_S + 1.0),
    ),
    Ending(
        ROW_KEEPALIVE, "the backend is dead", sweeping(config_with(keepalive=KEEPALIVE)),
        (F, "backend not responding"), NO_CLOSE, Outcome.KEEPALIVE, By.PROXY, "backend did not answer a ping within 1s",
        F, None, ends_within=(3.0, 3.5), backend=Behaviour(pong=False, answer_close=False),
    ),
    Ending(
        ROW_KEEPALIVE, "the client is dead", sweeping(config_with(keepalive=KEEPALIVE)),
        NO_CLOSE, (1001, "client not responding"), Outcome.KEEPALIVE, By.PROXY, "client did not answer a ping within 1s",
        None, 1001, ends_within=(3.0, 3.5), client=Behaviour(pong=False, answer_close=False),
    ),
    Ending(
        ROW_DRAIN, "an operator drains it (after drain.timeout)", admin_drain, (1012, "backend draining (admin)"),
        (1001, "backend draining (admin)"), Outcome.DRAIN, By.PROXY, "backend draining (admin)", 1012, 1001,
        ends_within=(DRAIN.timeout_s, DRAIN.timeout_s),
    ),
    Ending(
        ROW_DRAIN, "while the backend is in the middle of a frame: the client's close waits for its end",
        drain_while_the_backend_is_mid_frame, (1012, "backend draining (admin)"), (1001, "backend draining (admin)"),
        Outcome.DRAIN, By.PROXY, "backend draining (admin)", 1012, 1001, backend=Behaviour(answer_close=False),
    ),
    Ending(
        ROW_REMOVED, "a reload took it out (after drain.timeout)", removed_by_reload, (1012, "backend draining (removed by reload)"),
        (1001, "backend draining (removed by reload)"), Outcome.DRAIN, By.PROXY, "backend draining (removed by reload)", 1012, 1001,
        ends_within=(DRAIN.timeout_s, DRAIN.timeout_s),
    ),
    Ending(
        ROW_OPERATOR, "the default order", operator_closes, (1008, "closed by the operator"),
        (1001, "closed by the operator"), Outcome.ADMIN, By.PROXY, "closed by the operator", 1008, 1001,
    ),
    Ending(
        ROW_IDENTITY, "the oldest is closed for the newest", identity_over_its_cap,
        (1008, "too many sessions for this identity"), (1001, "too many sessions for this identity"),
        Outcome.IDENTITY_LIMIT, By.PROXY, "too many sessions for this identity", 1008, 1001,
    ),
    Ending(
        ROW_AGE, "the sweeper meets its deadline (20 s, 10 % jitter)", aging(config_with(idle_s=4 * AGE_S, max_session_age_s=AGE_S)),
        (1012, "session lifetime reached"), (1001, "session lifetime reached"), Outcome.LIFETIME, By.PROXY,
        "session lifetime reached", 1012, 1001, ends_within=(0.9 * AGE_S, 1.1 * AGE_S + AGE_S / 50),
    ),
    Ending(
        ROW_SHUTDOWN, "the app's close_spread", shutdown, (1001, "proxy shutting down"), (1001, "proxy shutting down"),
        Outcome.SHUTDOWN, By.PROXY, "proxy shutting down", 1001, 1001,
    ),
]

#: Rows left to the tests of the part that decides them: it orders the close through
#: ``RelayDriver.finish`` with its codes, as the drains and the operator's close above do, but
#: what triggers it (a JWT, an identity table, a revocation list, a pool's balance) is not the relay's.
NOT_RELAY = {
    "`auth.enforce_expiry`": "control.lifetime's deadlines, met by the sweeper (tests/proto/test_lifetime.py, "
    "tests/e2e/test_lifetime.py)",
    "a reload put the session's `jti`": "control.lifetime's revocations at reload (tests/e2e/test_lifetime.py)",
    "`pools.NAME.rebalance`": "control.rebalance picks the sessions (tests/balance/test_rebalance.py, tests/e2e/test_rebalance.py)",
}


def readme_rows() -> list[str]:
    """The situation cell of each row of the README's table "Once the session is established"."""
    text = README.read_text()
    start = text.index("Once the session is established:")
    rows: list[str] = []
    for line in text[start:].splitlines()[1:]:
        if not line.strip():
            if rows:
                break
            continue
        assert line.startswith("|"), line
        cell = line.split("|")[1].strip()
        if cell in ("situation", "---"):
            continue
        rows.append(cell)
    return rows


def test_every_row_of_the_readme_table_has_a_case_and_every_case_a_row() -> None:
    rows = readme_rows()
    keys = [c.row for c in CASES] + list(NOT_RELAY)
    for row in rows:
        matched = {k for k in keys if row.startswith(k)}
        assert len(matched) == 1, f"README row without exactly one case or exclusion here: {row!r} ({matched})"
    for key in set(keys):
        assert sum(row.startswith(key) for row in rows) == 1, f"a case for no (or several) README rows: {key!r}"


def matches(expected: str, got: str) -> bool:
    return got.startswith(expected[:-3]) if expected.endswith("...") else got == expected


def check_close(side: str, seen: Seen, expected: Expect) -> None:
    if expected is None:  # NO_CLOSE
        assert seen.close is None, f"the {side} got a close frame {seen.close}, expected TCP closed without one"
    else:
        assert seen.close is not None, f"the {side} got no close frame (frames: {seen.frames}, rest: {seen.rest!r})"
        code, reason = seen.close.close
        assert code == expected[0] and matches(expected[1], reason), (side, seen.close.close, expected)
    assert seen.eof_at is not None, f"the {side}'s TCP connection did not close"


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.row[:30]}: {c.name}" for c in CASES])
async def test_ending(case: Ending, driver: str, autojump_clock: trio.testing.MockClock) -> None:
    options = {"close_timeout_s": CLOSE_TIMEOUT_S, **case.options}
    with trio.fail_after(60):
        async with relayed(driver, **options) as r, trio.open_nursery() as nursery:
            s = Scene(r, nursery)
            nursery.start_soon(answer, r.client, s.client, case.client)
            nursery.start_soon(answer, r.backend, s.backend, case.backend)
            await case.act(s)
            start = trio.current_time()
            ended = await r.wait_ended() - start
            with trio.fail_after(1):  # the far ends see TCP close at once
                while s.client.eof_at is None or s.backend.eof_at is None:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    check_close("client", s.client, case.to_client)
    if case.row == ROW_TOO_BIG:  # no byte of the offending frame went to the other side
        assert [f.payload for f in s.client.frames + s.backend.frames] == (
            [b"a" * 60] if case.act is client_too_big_across_fragments else []
        )
        assert s.client.rest == s.backend.rest == b""
    if case.act is drain_while_the_backend_is_mid_frame:
        assert [len(f.payload) for f in s.client.frames] == [100]  # the whole frame, then the close
    check_close("backend", s.backend, case.to_backend)
    lo, hi = case.ends_within
    assert lo - 1e-6 <= ended <= hi + 1e-6, f"ended after {ended:g} s, expected within {case.ends_within}"
    machine = r.relay.machine
    assert (machine.kind, machine.closed_by) == (case.kind, case.by), (machine.kind, machine.closed_by, machine.reason)
    assert matches(case.reason, machine.reason), machine.reason
    assert (r.relay.down.own_close_code, r.relay.up.own_close_code) == (case.proxy_to_client, case.proxy_to_backend)
