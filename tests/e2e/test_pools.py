"""End to end: backend pools through the real proxy, over loopback.

Every test runs one (or two) in-process proxies in front of real trio-websocket
backends that *name themselves*: a backend's first message to each client is
its name, so a client knows where the balancer sent it. Clients are real
trio-websocket clients (cookies and keys go out as ``extra_headers``; the
101's ``Set-Cookie`` comes back in ``handshake_headers``; a refusal comes back
as ``ConnectionRejected`` with its status, headers and body), or a raw client
where one must choose its source address (the ``ip`` sticky key).

What is covered: the distributions of round_robin, least_conn and hash; sticky
cookies (format, pinning, forgery, repick/reject, return of the pinned
backend), ``ip`` and ``query`` keys; active health (time to leave and rejoin
rotation, a hung backend, every backend down, a new pool before its first
pass); ``max_connections``; retries and passive ejection; slow start; two
proxies that agree. Pure balancing logic is tested in ``tests/balance``; this
file only checks that the running proxy does what it says.

Timing assertions use trio's clock on both sides: backends stamp each arrival
with ``trio.current_time()``, and ``ProxyLog`` stamps each proxy log line the
same way as it is emitted (the proxy runs in the same trio run), so "the
backend went DOWN at t" is exact, not polled.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    WebSocketRequest,
    open_websocket_url,
    serve_websocket,
)

from tests.kit.servers import closed_port, make_config, start_proxy, start_tcp_backend, with_timeouts
from tests.kit.wait import SLACK_S, until
from wsproxy.app import App
from wsproxy.balance.policy import Candidate, rendezvous_order
from wsproxy.balance.sticky import cookie_value
from wsproxy.config.schema import (
    Address,
    BackendConfig,
    Config,
    HealthConfig,
    PassiveHealthConfig,
    PoolConfig,
    PoolName,
    RouteConfig,
    StickyConfig,
    StickyCookieConfig,
)
from wsproxy.balance.registry import BackendState, Health

HEALTH_PATH = "/healthz"
SECRET = b"pools-e2e-secret-0123456789abcdef"
COOKIE = "wsp"
COOKIE_MAX_AGE_S = 3600.0
#: What the timing tests measured, printed at the end of each (``pytest -s`` shows them).
TIMINGS: dict[str, float] = {}


# -- backends ------------------------------------------------------------------------------------


class Backend:
    """A trio-websocket backend that greets every client with its name, then echoes.

    ``arrivals`` holds the trio time of every client upgrade request (health
    checks, to ``HEALTH_PATH``, are counted in ``checks`` instead). The backend
    can be killed (listener and sessions gone at once) and restarted on the same
    port, told to ``hang`` (read the upgrade request, never answer it), to fail
    its health checks (503), or to delay their answer.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.arrivals: list[float] = []
        self.checks = 0
        self.hang = False
        self.fail_health = False
        self.health_delay_s = 0.0
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    def config(self, *, weight: int = 1, max_connections: int = 0) -> BackendConfig:
        return BackendConfig(address=self.address, weight=weight, max_connections=max_connections)

    async def start(self, nursery: trio.Nursery) -> Backend:
        """Listen (on the same port as before, after a kill) and serve until killed."""
        scope = self._scope = trio.CancelScope()
        stopped = self._stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await serve_websocket(self._handle, "127.0.0.1", self.port, None, task_status=task_status)
            finally:
                stopped.set()

        server = await nursery.start(run)
        self.port = int(server.port)  # type: ignore[attr-defined]
        return self

    async def kill(self) -> None:
        """Close the listener and every connection, like a crashed process."""
        assert self._scope is not None and self._stopped is not None
        self._scope.cancel()
        await self._stopped.wait()

    async def _handle(self, request: WebSocketRequest) -> None:
        if request.path == HEALTH_PATH:
            self.checks += 1
            if self.health_delay_s:
                await trio.sleep(self.health_delay_s)
            if self.fail_health:
                await request.reject(503)
                return
        else:
            self.arrivals.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        ws = await request.accept()
        try:
            if request.path != HEALTH_PATH:
                await ws.send_message(self.name)
            while True:  # keeps reading: answers the health check's ping and close
                await ws.send_message(await ws.get_message())
        except ConnectionClosed:
            pass


async def start_backends(nursery: trio.Nursery, *names: str) -> list[Backend]:
    return [await Backend(name).start(nursery) for name in names]


# -- configs -------------------------------------------------------------------------------------


def pool(*backends: Backend | BackendConfig, name: str = "main", **kw: object) -> PoolConfig:
    configs = tuple(b.config() if isinstance(b, Backend) else b for b in backends)
    return PoolConfig(name=PoolName(name), backends=configs, **kw)  # type: ignore[arg-type]


def config(*pools: PoolConfig, routes: tuple[RouteConfig, ...] | None = None, **timeouts: float) -> Config:
    """One listener; the first pool serves every path unless ``routes`` say otherwise."""
    base = dataclasses.replace(
        make_config([]),
        routes=routes or (RouteConfig(pool=pools[0].name),),
        pools={p.name: p for p in pools},
    )
    return with_timeouts(base, **timeouts) if timeouts else base


def health(type: str = "websocket", **kw: float) -> HealthConfig:
    kw.setdefault("interval_s", 0.1)
    kw.setdefault("timeout_s", 0.5)
    return HealthConfig(type=type, **kw)  # type: ignore[arg-type]


def cookie_sticky(on_unavailable: str = "repick", secret: bytes = SECRET) -> StickyConfig:
    return StickyConfig(
        source="cookie",
        name=COOKIE,
        cookie=StickyCookieConfig(secret=secret, secret_file="<test>", max_age_s=COOKIE_MAX_AGE_S),
        on_unavailable=on_unavailable,
    )


# -- the proxy's log, on trio's clock ------------------------------------------------------------


class ProxyLog(logging.Handler):
    """Every ``wsproxy`` log line with the trio time at which it was emitted."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:  # pragma: no cover - outside the run
            now = math.nan
        self.lines.append((now, record.getMessage()))

    def matching(self, *tokens: str, since: float = -math.inf) -> list[tuple[float, str]]:
        """Lines emitted at or after ``since`` that hold every ``key=value`` token."""
        return [
            (t, line)
            for t, line in self.lines
            if t >= since and all(re.search(rf"(^| ){re.escape(tok)}( |$)", line) for tok in tokens)
        ]

    async def wait_for(self, *tokens: str, since: float = -math.inf, timeout_s: float = 3.0) -> tuple[float, str]:
        """The first matching line (waiting for it); its time and text."""
        await until(
            lambda: bool(self.matching(*tokens, since=since)),
            timeout_s=timeout_s, what=f"a log line with {tokens}", show=lambda: "log:\n" + self.dump(),
        )  # fmt: skip
        return self.matching(*tokens, since=since)[0]

    def dump(self) -> str:
        return "\n".join(f"{t:10.3f} {line}" for t, line in self.lines)


@pytest.fixture
def proxy_log(caplog: pytest.LogCaptureFixture) -> Iterator[ProxyLog]:
    caplog.set_level(logging.INFO, logger="wsproxy")
    handler = ProxyLog()
    logger = logging.getLogger("wsproxy")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def health_line(backend: Backend, state: str) -> tuple[str, ...]:
    return ("event=health", f"backend={backend.address}", f"state={state}")


# -- clients -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a client saw: 101 and the backend's name, or a refusal."""

    status: int
    backend: str | None  # the greeting of the backend, on a 101
    headers: dict[bytes, bytes]  # response headers, lower-case names
    body: bytes = b""

    @property
    def set_cookie(self) -> str | None:
        value = self.headers.get(b"set-cookie")
        return None if value is None else value.decode()

    @property
    def cookie(self) -> str | None:
        """The value of our sticky cookie in ``Set-Cookie``, if one was issued."""
        value = self.set_cookie
        return None if value is None else value.split(";", 1)[0].partition("=")[2]


def cookie_header(value: str) -> tuple[bytes, bytes]:
    return (b"Cookie", f"{COOKIE}={value}".encode())


async def visit(
    port: int, path: str = "/", headers: Sequence[tuple[bytes, bytes]] = ()
) -> Outcome:
    """One session through the proxy: connect, read the greeting, close."""
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}{path}", extra_headers=list(headers)) as ws:
            name = await ws.get_message()
            assert isinstance(name, str)
            return Outcome(101, name, dict(ws.handshake_headers))
    except ConnectionRejected as exc:
        return Outcome(exc.status_code, None, dict(exc.headers), exc.body or b"")


async def hold(
    stack: AsyncExitStack, port: int, path: str = "/", headers: Sequence[tuple[bytes, bytes]] = ()
) -> tuple[str, WebSocketConnection]:
    """Open a session that stays open until ``stack`` closes it; the backend's name and the connection."""
    ws = await stack.enter_async_context(open_websocket_url(f"ws://127.0.0.1:{port}{path}", extra_headers=list(headers)))
    name = await ws.get_message()
    assert isinstance(name, str)
    return name, ws


async def visit_from(port: int, source_ip: str) -> str:
    """A raw upgrade from ``source_ip`` (any 127/8 address); the greeting of the backend."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source_ip)
    async with stream:
        key = os.urandom(16).hex()[:22].encode() + b"=="
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        buf = b""
        while b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < 2:
            data = await stream.receive_some(65536)
            assert data, buf
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        length = rest[1] & 0x7F  # an unmasked text frame of < 126 bytes: the name
        while len(rest) < 2 + length:
            rest += await stream.receive_some(65536)
        assert rest[0] == 0x81, rest
        return rest[2 : 2 + length].decode()


def home(backends: Sequence[Backend], key: bytes) -> str:
    """The backend a sticky key hashes to (the pure rendezvous order over equal weights)."""
    candidates = [Candidate(b.config(), BackendState(b.address), 1.0) for b in backends]
    first = rendezvous_order(candidates, key)[0]
    return next(b.name for b in backends if b.address == first.backend.address)


async def wait_health(app: App, backend: Backend, health: Health, timeout_s: float = 3.0) -> None:
    with trio.move_on_after(timeout_s):
        while app.registry.health("main", backend.address).health is not health:
            await trio.sleep(0.005)
        return
    raise AssertionError(f"{backend.name} not {health.value} within {timeout_s}s: {app.registry.health('main', backend.address)}")


def report(name: str, value_s: float) -> None:
    TIMINGS[name] = value_s
    print(f"timing {name} = {value_s * 1000:.0f} ms")


# -- 1. distributions ----------------------------------------------------------------------------


async def test_round_robin_weights_one_to_two_exact(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a, b = await start_backends(nursery, "a", "b")
        app, port = await start_proxy(nursery, config(pool(a.config(weight=1), b.config(weight=2))))
        seen = [(await visit(port)).backend or "-" for _ in range(30)]
        assert Counter(seen) == {"a": 10, "b": 20}
        # smooth: never three in a row of the heavy one, never two of the light one
        assert "a,a" not in ",".join(seen) and "b,b,b" not in ",".join(seen)
        assert len(a.arrivals) == 10 and len(b.arrivals) == 20


async def test_least_conn_sends_new_sessions_to_the_less_loaded_backend(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a, b = await start_backends(nursery, "a", "b")
        app, port = await start_proxy(nursery, config(pool(a, b, balance="least_conn")))
        async with AsyncExitStack() as stack:
            # Six held sessions: least_conn keeps the two backends level.
            held = [await hold(stack, port) for _ in range(6)]
            assert Counter(name for name, _ in held) == {"a": 3, "b": 3}
            # a's three sessions close, b's stay open: the next three all go to a.
            for name, ws in held:
                if name == "a":
                    await ws.aclose()
            with trio.move_on_after(3):
                while app.registry.state(a.address).active:
                    await trio.sleep(0.005)
            assert app.registry.state(a.address).active == 0
            assert app.registry.state(b.address).active == 3
            assert [(await hold(stack, port))[0] for _ in range(3)] == ["a", "a", "a"]
            # level again (3 and 3): the next ones alternate
            assert Counter([(await hold(stack, port))[0] for _ in range(4)]) == {"a": 2, "b": 2}


async def test_hash_on_a_header_is_sticky_and_spreads(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        backends = await start_backends(nursery, "a", "b", "c")
        sticky = StickyConfig(source="header", name="X-User")
        app, port = await start_proxy(nursery, config(pool(*backends, balance="hash", sticky=sticky)))
        alice = [(await visit(port, headers=[(b"X-User", b"alice")])).backend for _ in range(10)]
        assert alice == [home(backends, b"alice")] * 10
        placed = {}
        for i in range(60):
            user = f"user-{i}".encode()
            placed[user] = (await visit(port, headers=[(b"X-User", user)])).backend
            assert placed[user] == home(backends, user), user
        spread = Counter(placed.values())
        assert set(spread) == {"a", "b", "c"} and min(spread.values()) >= 5, spread
        # the same values again: each lands where it did the first time
        for user in list(placed)[:15]:
            assert (await visit(port, headers=[(b"X-User", user)])).backend == placed[user]


# -- 2. sticky cookies ---------------------------------------------------------------------------


COOKIE_RE = re.compile(rf"^{COOKIE}=([A-Za-z0-9_-]{{22}}); Path=/; Max-Age=3600; HttpOnly; SameSite=Lax$")


async def test_cookie_is_issued_pins_and_ignores_forgeries(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    with trio.fail_after(15):
        a, b = await start_backends(nursery, "a", "b")
        by_name = {"a": a, "b": b}
        app, port = await start_proxy(nursery, config(pool(a, b, sticky=cookie_sticky())))

        first = await visit(port)
        assert first.status == 101 and first.set_cookie is not None
        assert COOKIE_RE.match(first.set_cookie), first.set_cookie  # no Secure on plain ws://
        pinned = first.backend
        assert pinned is not None
        assert first.cookie == cookie_value(SECRET, "main", by_name[pinned].address)

        # ten reconnections with the cookie: always the same backend, although round_robin alternates
        again = [await visit(port, headers=[cookie_header(first.cookie)]) for _ in range(10)]
        assert [o.backend for o in again] == [pinned] * 10
        assert all(o.cookie in (None, first.cookie) for o in again), [o.set_cookie for o in again]
        assert len(proxy_log.matching("event=open", "sticky=hit")) == 10

        # without a cookie the balancer still alternates; the other backend's cookie differs
        other = await visit(port)
        assert other.backend != pinned and other.cookie not in (None, first.cookie)

        # forged values, a cookie of another secret and one of another pool: ignored
        forged = [
            "A" * 22,
            first.cookie[:-1] + ("A" if first.cookie[-1] != "A" else "B"),
            cookie_value(b"another-secret-0123456789abcdef!", "main", by_name[pinned].address),
            cookie_value(SECRET, "other", by_name[pinned].address),
            "\u00e9" * 22,
        ]
        results = [await visit(port, headers=[cookie_header(value)]) for value in forged]
        # the balanced choice: round robin goes on alternating
        assert [o.backend for o in results] == [pinned, other.backend, pinned, other.backend, pinned]
        for o in results:
            assert o.set_cookie is not None and COOKIE_RE.match(o.set_cookie), o.set_cookie
            assert o.cookie == cookie_value(SECRET, "main", by_name[o.backend or ""].address)
        assert len(proxy_log.matching("event=open", "sticky=miss")) == 5


async def test_cookie_repick_when_pinned_backend_dies_and_back_when_it_returns(
    nursery: trio.Nursery, proxy_log: ProxyLog
) -> None:
    with trio.fail_after(15):
        a, b = await start_backends(nursery, "a", "b")
        hc = health(rise=2, fall=2)
        app, port = await start_proxy(nursery, config(pool(a, b, sticky=cookie_sticky(), health=hc)))
        await wait_health(app, a, Health.UP)
        await wait_health(app, b, Health.UP)
        cookie_a = cookie_value(SECRET, "main", a.address)
        cookie_b = cookie_value(SECRET, "main", b.address)
        assert (await visit(port, headers=[cookie_header(cookie_a)])).backend == "a"

        await a.kill()
        killed_at = trio.current_time()
        # Before the checks notice: a is still UP, the connect is refused, the session fails
        # over to b, and the pin follows it.
        assert app.registry.health("main", a.address).health is Health.UP  # fall 2 x interval 0.1 s: not yet
        failover = await visit(port, headers=[cookie_header(cookie_a)])
        assert (failover.status, failover.backend, failover.cookie) == (101, "b", cookie_b)
        _, line = proxy_log.matching("event=upstream_failed", f"backend={a.address}")[0]
        assert "reason=\"connect failed: Connection refused\"" in line

        down_at, _ = await proxy_log.wait_for(*health_line(a, "down"))
        report("cookie: kill -> down", down_at - killed_at)
        repicked = [await visit(port, headers=[cookie_header(cookie_a)]) for _ in range(5)]
        assert [(o.backend, o.cookie) for o in repicked] == [("b", cookie_b)] * 5
        assert len(proxy_log.matching("event=open", "sticky=repick", since=down_at)) == 5

        await a.start(nursery)  # same port
        restarted_at = trio.current_time()
        up_at, _ = await proxy_log.wait_for(*health_line(a, "up"), since=restarted_at)
        report("cookie: restart -> up", up_at - restarted_at)
        back = [await visit(port, headers=[cookie_header(cookie_a)]) for _ in range(5)]
        assert [o.backend for o in back] == ["a"] * 5
        assert all(o.cookie in (None, cookie_a) for o in back)


async def test_cookie_pinned_backend_draining_repick(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    with trio.fail_after(10):
        a, b = await start_backends(nursery, "a", "b")
        app, port = await start_proxy(nursery, config(pool(a, b, sticky=cookie_sticky("repick"))))
        cookie_a = cookie_value(SECRET, "main", a.address)
        app.registry.state(a.address).draining = True
        for _ in range(4):
            o = await visit(port, headers=[cookie_header(cookie_a)])
            assert (o.status, o.backend, o.cookie) == (101, "b", cookie_value(SECRET, "main", b.address))
        assert len(proxy_log.matching("event=open", "sticky=repick")) == 4
        app.registry.state(a.address).draining = False
        assert (await visit(port, headers=[cookie_header(cookie_a)])).backend == "a"


async def test_cookie_reject_answers_503_while_pinned_backend_is_unavailable(
    nursery: trio.Nursery, proxy_log: ProxyLog
) -> None:
    with trio.fail_after(10):
        a, b = await start_backends(nursery, "a", "b")
        hc = health(rise=1, fall=2)
        app, port = await start_proxy(nursery, config(pool(a, b, sticky=cookie_sticky("reject"), health=hc)))
        await wait_health(app, a, Health.UP)
        await wait_health(app, b, Health.UP)
        cookie_a = cookie_value(SECRET, "main", a.address)

        # draining
        app.registry.state(a.address).draining = True
        o = await visit(port, headers=[cookie_header(cookie_a)])
        assert o.status == 503 and o.body == b"no backend available in pool main\n", o
        assert b"retry-after" not in o.headers
        assert proxy_log.matching("event=refused", "status=503")[-1][1].endswith(
            f"reason=\"pool main: pinned backend {a.address} unavailable (draining, reject)\""
        )
        # others are not affected: no cookie goes to b, b's cookie goes to b
        assert (await visit(port)).backend == "b"
        assert (await visit(port, headers=[cookie_header(cookie_value(SECRET, "main", b.address))])).backend == "b"
        app.registry.state(a.address).draining = False
        assert (await visit(port, headers=[cookie_header(cookie_a)])).backend == "a"

        # killed, then DOWN
        await a.kill()
        await proxy_log.wait_for(*health_line(a, "down"))
        o = await visit(port, headers=[cookie_header(cookie_a)])
        assert o.status == 503 and b"pool main" in o.body
        assert proxy_log.matching("event=refused", "status=503")[-1][1].endswith('(down, reject)"')
        # back: the cookie pins to it again
        await a.start(nursery)
        await proxy_log.wait_for(*health_line(a, "up"), since=trio.current_time())
        assert (await visit(port, headers=[cookie_header(cookie_a)])).backend == "a"


# -- 3. sticky keys ------------------------------------------------------------------------------


async def test_ip_key_pins_each_client_address(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        backends = await start_backends(nursery, "a", "b", "c")
        sticky = StickyConfig(source="ip")
        app, port = await start_proxy(nursery, config(pool(*backends, sticky=sticky)))  # round_robin underneath
        assert [await visit_from(port, "127.0.0.1") for _ in range(10)] == [home(backends, b"127.0.0.1")] * 10
        placed = {}
        for i in range(2, 32):
            ip = f"127.0.0.{i}"
            placed[ip] = await visit_from(port, ip)
            assert placed[ip] == home(backends, ip.encode()), ip
        assert len(set(placed.values())) == 3, Counter(placed.values())
        for ip in list(placed)[:10]:
            assert await visit_from(port, ip) == placed[ip]


async def test_query_key_same_room_same_backend(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    with trio.fail_after(15):
        backends = await start_backends(nursery, "a", "b", "c")
        sticky = StickyConfig(source="query", name="room")
        app, port = await start_proxy(nursery, config(pool(*backends, sticky=sticky)))
        alpha = [(await visit(port, "/chat?room=alpha&user=" + str(i))).backend for i in range(10)]
        assert alpha == [home(backends, b"alpha")] * 10
        rooms = {f"r{i}": (await visit(port, f"/chat?room=r{i}")).backend for i in range(30)}
        assert all(rooms[r] == home(backends, r.encode()) for r in rooms)
        assert len(set(rooms.values())) == 3
        # no room: plain round robin (sticky=miss)
        assert sorted([(await visit(port, "/chat")).backend or "" for _ in range(3)]) == ["a", "b", "c"]
        assert len(proxy_log.matching("event=open", "sticky=miss")) == 3


# -- 4. active health ----------------------------------------------------------------------------


async def test_killed_backend_leaves_rotation_within_fall_intervals_and_returns_after_rise(
    nursery: trio.Nursery, proxy_log: ProxyLog
) -> None:
    interval_s, fall, rise = 0.1, 2, 3
    with trio.fail_after(15):
        a, b = await start_backends(nursery, "a", "b")
        hc = health(interval_s=interval_s, fall=fall, rise=rise)
        # retries 0: a session sent to a dead backend fails, so the client sees when rotation changes
        app, port = await start_proxy(nursery, config(pool(a, b, health=hc, retries=0)))
        await wait_health(app, a, Health.UP)
        await wait_health(app, b, Health.UP)
        assert Counter([(await visit(port)).backend for _ in range(4)]) == {"a": 2, "b": 2}

        await a.kill()
        killed_at = trio.current_time()
        failures: list[float] = []
        down_at = None
        while down_at is None or trio.current_time() < down_at + 0.1:
            o = await visit(port)
            if o.status != 101:
                assert o.status == 502, o
                failures.append(trio.current_time())
            else:
                assert o.backend == "b"
            if down_at is None and (lines := proxy_log.matching(*health_line(a, "down"))):
                down_at = lines[0][0]
            await trio.sleep(0.01)
        assert down_at is not None
        leave_s = down_at - killed_at
        report("health: kill -> down (websocket, interval 0.1, fall 2)", leave_s)
        report("health: kill -> last failed session", (failures[-1] if failures else killed_at) - killed_at)
        assert leave_s <= fall * interval_s * 1.1 + interval_s + SLACK_S
        assert leave_s >= (fall - 1) * interval_s * 0.9 - 0.01
        assert all(t <= down_at + 0.01 for t in failures), (down_at, failures)
        _, line = proxy_log.matching(*health_line(a, "down"))[0]
        assert "reason=\"2 consecutive failures: connect refused\"" in line and "was=up" in line

        arrivals_before = len(a.arrivals)
        assert [(await visit(port)).backend for _ in range(6)] == ["b"] * 6

        await a.start(nursery)  # same port
        restarted_at = trio.current_time()
        first_on_a = None
        while first_on_a is None:
            if (await visit(port)).backend == "a":
                first_on_a = trio.current_time()
            await trio.sleep(0.005)
        up_at, line = await proxy_log.wait_for(*health_line(a, "up"), since=restarted_at)
        rejoin_s = up_at - restarted_at
        report("health: restart -> up (rise 3)", rejoin_s)
        report("health: restart -> first session on a", first_on_a - restarted_at)
        assert f"reason=\"{rise} consecutive passes\"" in line and "was=down" in line
        assert (rise - 1) * interval_s * 0.9 - 0.01 <= rejoin_s <= rise * interval_s * 1.1 + SLACK_S
        assert first_on_a >= up_at
        # every session a got after the restart came after it was UP
        assert all(t >= up_at for t in a.arrivals[arrivals_before:])


async def test_hung_backend_is_taken_out_by_websocket_checks(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    interval_s, timeout_s, fall = 0.1, 0.2, 2
    with trio.fail_after(15):
        a, b = await start_backends(nursery, "a", "b")
        hc = health(interval_s=interval_s, timeout_s=timeout_s, fall=fall, rise=2)
        cfg = config(pool(a, b, health=hc, retries=1), upstream_handshake_s=0.3)
        app, port = await start_proxy(nursery, cfg)
        await wait_health(app, a, Health.UP)
        await wait_health(app, b, Health.UP)

        a.hang = True  # accepts TCP, reads the upgrade, never answers
        hung_at = trio.current_time()
        while not proxy_log.matching(*health_line(a, "down")):
            o = await visit(port)  # a session sent to a waits 0.3 s, then goes to b
            assert (o.status, o.backend) == (101, "b"), o
        down_at, line = proxy_log.matching(*health_line(a, "down"))[0]
        report("health: hang -> down (timeout 0.2, interval 0.1, fall 2)", down_at - hung_at)
        assert f"timed out after {timeout_s:g}s" in line
        assert down_at - hung_at <= fall * (timeout_s + interval_s * 1.1) + interval_s + SLACK_S

        sessions_before = len(a.arrivals)
        assert all(t < down_at for t in a.arrivals)
        assert [(await visit(port)).backend for _ in range(10)] == ["b"] * 10
        assert len(a.arrivals) == sessions_before  # nothing was sent to a after it was DOWN
        assert app.registry.health("main", a.address).health is Health.DOWN


async def test_every_backend_down_answers_503_naming_the_pool(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    with trio.fail_after(10):
        dead = [BackendConfig(address=Address("127.0.0.1", closed_port())) for _ in range(2)]
        chat = pool(*dead, name="chat", health=health("tcp", fall=2))
        app, port = await start_proxy(nursery, config(chat))
        for backend in dead:
            await proxy_log.wait_for("event=health", f"backend={backend.address}", "state=down")
        o = await visit(port, "/chat")
        assert o.status == 503, o
        assert o.body == b"no backend available in pool chat\n"
        assert o.headers.get(b"content-type", b"").startswith(b"text/plain")
        assert b"retry-after" not in o.headers
        _, line = proxy_log.matching("event=refused", "status=503")[-1]
        assert line.endswith("reason=\"pool chat: every backend is down\""), line


async def test_new_pool_takes_no_traffic_before_its_first_pass(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    with trio.fail_after(10):
        # The first pass of a's check takes 0.4 s (the backend delays its answer).
        slow, quick = await start_backends(nursery, "slow", "quick")
        slow.health_delay_s = 0.4
        started_at = trio.current_time()
        app, port = await start_proxy(nursery, config(pool(slow, health=health(interval_s=1.0, timeout_s=2.0))))
        refused = 0
        while (o := await visit(port)).status != 101:
            assert o.status == 503 and o.body == b"no backend available in pool main\n", o
            assert trio.current_time() - started_at < 0.4 + SLACK_S
            refused += 1
            await trio.sleep(0.02)
        served_at = trio.current_time()
        assert refused > 0
        assert any(line.endswith("reason=\"pool main: every backend is not yet healthy\"") for _, line in proxy_log.lines)
        up_at, line = proxy_log.matching(*health_line(slow, "up"))[0]
        assert "was=unknown" in line
        # one check (0.4 s) after start, not one interval (1 s) later
        assert 0.4 <= up_at - started_at <= 0.4 + SLACK_S
        assert served_at >= up_at
        report("health: start -> first pass (check takes 0.4 s)", up_at - started_at)
        assert o.backend == "slow" and all(t >= up_at for t in slow.arrivals)

        # A backend that answers at once is UP within one check of the start (interval 1 s).
        started_at = trio.current_time()
        app2, port2 = await start_proxy(nursery, config(pool(quick, health=health(interval_s=1.0))))
        while (o := await visit(port2)).status != 101:
            assert o.status == 503
            await trio.sleep(0.005)
        report("health: start -> first session served (quick check)", trio.current_time() - started_at)
        assert trio.current_time() - started_at < 0.2
        assert quick.checks == 1


# -- 5. capacity ---------------------------------------------------------------------------------


async def test_max_connections_full_pool_answers_503_with_retry_after(
    nursery: trio.Nursery, proxy_log: ProxyLog
) -> None:
    with trio.fail_after(10):
        a, b = await start_backends(nursery, "a", "b")
        app, port = await start_proxy(
            nursery, config(pool(a.config(max_connections=1), b.config(max_connections=1)))
        )
        async with AsyncExitStack() as stack:
            first, _ = await hold(stack, port)
            second, ws_second = await hold(stack, port)
            assert {first, second} == {"a", "b"}
            third = await visit(port)
            assert third.status == 503, third
            assert third.headers.get(b"retry-after") == b"5"
            assert third.body == b"no backend available in pool main\n"
            assert proxy_log.matching("event=refused", "status=503")[-1][1].endswith(
                "reason=\"pool main: every backend is full\""
            )
            await ws_second.aclose()
            freed = {"a": a, "b": b}[second]
            with trio.move_on_after(3):
                while app.registry.state(freed.address).active:
                    await trio.sleep(0.005)
            assert app.registry.state(freed.address).active == 0
            assert (await visit(port)).backend == second  # capacity came back


async def test_max_connections_holds_under_concurrent_handshakes(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        a, b = await start_backends(nursery, "a", "b")
        app, port = await start_proxy(
            nursery, config(pool(a.config(max_connections=1), b.config(max_connections=1), balance="least_conn"))
        )
        outcomes: list[Outcome] = []
        release = trio.Event()

        async def client() -> None:
            try:
                async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
                    outcomes.append(Outcome(101, str(await ws.get_message()), {}))
                    await release.wait()
            except ConnectionRejected as exc:
                outcomes.append(Outcome(exc.status_code, None, dict(exc.headers), exc.body or b""))

        async with trio.open_nursery() as clients:
            for _ in range(6):  # all six handshakes at once
                clients.start_soon(client)
            with trio.move_on_after(3):
                while len(outcomes) < 6:
                    await trio.sleep(0.005)
            assert sorted((o.status, o.backend) for o in outcomes) == [(101, "a"), (101, "b")] + [(503, None)] * 4
            assert all(o.headers.get(b"retry-after") == b"5" for o in outcomes if o.status == 503)
            assert [app.registry.state(x.address).active for x in (a, b)] == [1, 1]
            release.set()


async def test_cookie_pinned_backend_full(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    with trio.fail_after(10):
        a, b = await start_backends(nursery, "a", "b")
        backends = (a.config(max_connections=1), b)
        repick = pool(*backends, name="repick", sticky=cookie_sticky("repick"))
        reject = pool(*backends, name="reject", sticky=cookie_sticky("reject"))
        routes = (RouteConfig(path="/repick", pool=PoolName("repick")), RouteConfig(path="/reject", pool=PoolName("reject")))
        app, port = await start_proxy(nursery, config(repick, reject, routes=routes))
        to_a = {name: cookie_header(cookie_value(SECRET, name, a.address)) for name in ("repick", "reject")}
        # the pinning cookie sits among others in the Cookie header
        crowded = (b"Cookie", b"theme=dark; " + to_a["repick"][1] + b"; lang=en")
        assert (await visit(port, "/repick", [crowded])).backend == "a"
        async with AsyncExitStack() as stack:
            assert (await hold(stack, port, "/repick", [to_a["repick"]]))[0] == "a"  # a is full now
            o = await visit(port, "/repick", [to_a["repick"]])
            assert (o.status, o.backend, o.cookie) == (101, "b", cookie_value(SECRET, "repick", b.address))
            o = await visit(port, "/reject", [to_a["reject"]])
            assert o.status == 503 and o.headers.get(b"retry-after") == b"5", o
            assert o.body == b"no backend available in pool reject\n"
            assert proxy_log.matching("event=refused", "status=503")[-1][1].endswith('(full, reject)"')


# -- 6. retries and passive ejection -------------------------------------------------------------


async def start_slammer(nursery: trio.Nursery) -> tuple[BackendConfig, list[float]]:
    """A raw TCP backend that accepts and closes at once; the trio time of each connection."""
    attempts: list[float] = []

    async def slam(stream: trio.SocketStream) -> None:
        attempts.append(trio.current_time())
        await stream.aclose()

    port = await start_tcp_backend(nursery, slam)
    return BackendConfig(address=Address("127.0.0.1", port)), attempts


async def test_refused_backend_is_retried_on_the_next(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    with trio.fail_after(10):
        (good,) = await start_backends(nursery, "good")
        refused = BackendConfig(address=Address("127.0.0.1", closed_port()))
        app, port = await start_proxy(nursery, config(pool(refused, good)))
        outcomes = [await visit(port) for _ in range(10)]
        assert [(o.status, o.backend) for o in outcomes] == [(101, "good")] * 10
        failed = proxy_log.matching("event=upstream_failed", f"backend={refused.address}")
        assert len(failed) == 5  # round robin put the refused one first every other time
        assert all("reason=\"connect failed: Connection refused\"" in line for _, line in failed), failed
        assert not proxy_log.matching("event=ejected")  # no passive health configured


async def test_new_cookie_follows_the_failover(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    with trio.fail_after(10):
        (good,) = await start_backends(nursery, "good")
        refused = BackendConfig(address=Address("127.0.0.1", closed_port()))
        app, port = await start_proxy(nursery, config(pool(refused, good, sticky=cookie_sticky())))
        outcomes = [await visit(port) for _ in range(4)]  # round robin puts the refused one first twice
        assert [(o.status, o.backend) for o in outcomes] == [(101, "good")] * 4
        assert {o.cookie for o in outcomes} == {cookie_value(SECRET, "main", good.address)}
        assert len(proxy_log.matching("event=upstream_failed", f"backend={refused.address}")) == 2


async def test_passive_ejection_skips_the_failing_backend_then_tries_it_again(
    nursery: trio.Nursery, proxy_log: ProxyLog
) -> None:
    ejection_s = 1.0
    with trio.fail_after(15):
        (good,) = await start_backends(nursery, "good")
        slammer, attempts = await start_slammer(nursery)
        passive = PassiveHealthConfig(failures=2, window_s=10.0, ejection_s=ejection_s, max_ejected_percent=50)
        app, port = await start_proxy(nursery, config(pool(slammer, good, passive=passive)))

        while not proxy_log.matching("event=ejected"):
            assert (await visit(port)).backend == "good"
            assert len(attempts) <= 2
        ejected_at, line = proxy_log.matching("event=ejected")[0]
        assert f"backend={slammer.address}" in line and "reason=\"ejected for 1s: 2 failures within 10s\"" in line
        assert len(attempts) == 2
        assert len(proxy_log.matching("event=upstream_failed", f"backend={slammer.address}")) == 2

        # during the ejection: no connect attempt at all
        while trio.current_time() < ejected_at + ejection_s - 0.15:
            assert (await visit(port)).backend == "good"
            await trio.sleep(0.01)
        assert len(attempts) == 2, attempts

        # after it: tried again (and, failing twice more, ejected for twice as long)
        await trio.sleep_until(ejected_at + ejection_s + 0.01)
        for _ in range(6):
            assert (await visit(port)).backend == "good"
            if len(attempts) > 2:
                break
        assert len(attempts) == 3, attempts
        report("passive: ejected -> next attempt", attempts[2] - ejected_at)
        assert attempts[2] >= ejected_at + ejection_s
        while not proxy_log.matching("event=ejected", since=ejected_at + ejection_s):
            assert (await visit(port)).backend == "good"
            assert len(attempts) <= 4
        _, line = proxy_log.matching("event=ejected", since=ejected_at + ejection_s)[0]
        assert "reason=\"ejected for 2s: 2 failures within 10s\"" in line


async def test_passive_ejection_respects_max_ejected_percent(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    with trio.fail_after(10):
        (s1, _), (s2, _) = await start_slammer(nursery), await start_slammer(nursery)
        passive = PassiveHealthConfig(failures=2, window_s=10.0, ejection_s=5.0, max_ejected_percent=50)
        app, port = await start_proxy(nursery, config(pool(s1, s2, passive=passive)))
        for _ in range(6):
            o = await visit(port)
            assert o.status == 502, o  # both fail the upgrade
        ejected = proxy_log.matching("event=ejected")
        assert len(ejected) == 1, ejected  # the cap keeps one of two in the pool


# -- 7. slow start -------------------------------------------------------------------------------


async def test_slow_start_gives_a_new_backend_a_small_share_at_first(
    nursery: trio.Nursery, proxy_log: ProxyLog
) -> None:
    slow_start_s = 2.0
    with trio.fail_after(20):
        a, b = await start_backends(nursery, "a", "b")
        b.fail_health = True
        hc = health(interval_s=0.1, rise=1, fall=2)
        app, port = await start_proxy(
            nursery, config(pool(a, b, balance="least_conn", slow_start_s=slow_start_s, health=hc))
        )
        a_up_at, _ = await proxy_log.wait_for(*health_line(a, "up"))
        await trio.sleep_until(a_up_at + slow_start_s)  # a has its full weight now
        async with AsyncExitStack() as stack:
            b.fail_health = False
            b_up_at, _ = await proxy_log.wait_for(*health_line(b, "up"))
            ramp: list[str] = []
            while len(ramp) < 40 and trio.current_time() < b_up_at + 0.3:
                ramp.append((await hold(stack, port))[0])
            share = Counter(ramp)
            print(f"slow start: {len(ramp)} sessions within 0.3 s of b UP: {dict(share)}")
            assert len(ramp) >= 20, "too few sessions within 0.3 s to judge"
            assert share["b"] <= len(ramp) // 4, share  # fair would be half
            # after the ramp, least_conn evens the load out: b takes the new sessions
            await trio.sleep_until(b_up_at + slow_start_s + 0.05)
            after = Counter([(await hold(stack, port))[0] for _ in range(10)])
            assert after["b"] == 10, after


async def test_slow_start_after_a_passive_ejection_ends(nursery: trio.Nursery, proxy_log: ProxyLog) -> None:
    """Issue 17 item 6: a backend back from passive ejection ramps with slow_start, not at full share at once."""
    slow_start_s, ejection_s = 6.0, 0.5
    with trio.fail_after(25):
        a, b = await start_backends(nursery, "a", "b")
        passive = PassiveHealthConfig(failures=2, window_s=10.0, ejection_s=ejection_s, max_ejected_percent=50)
        started = trio.current_time()
        app, port = await start_proxy(
            nursery, config(pool(a, b, balance="least_conn", slow_start_s=slow_start_s, passive=passive))
        )
        # both were marked UP at start (no active checks): let both ramp past half their weight
        await trio.sleep_until(started + slow_start_s / 2)
        await b.kill()
        while not proxy_log.matching("event=ejected", f"backend={b.address}"):
            assert (await visit(port)).backend == "a"  # b refuses; the session fails over to a
        ejected_at, line = proxy_log.matching("event=ejected", f"backend={b.address}")[0]
        assert "ejected for 0.5s" in line, line
        await b.start(nursery)  # the same port: b is fine again, but still ejected
        await trio.sleep_until(ejected_at + ejection_s + 0.01)
        async with AsyncExitStack() as stack:
            after = Counter([(await hold(stack, port))[0] for _ in range(20)])
        print(f"slow start after ejection: 20 sessions right after it ended: {dict(after)}")
        assert after["b"] <= 3, after  # least_conn without the ramp gives b half: 10 of 20


async def test_a_pool_without_checks_ignores_another_pools_failing_check_of_the_same_address(
    nursery: trio.Nursery, proxy_log: ProxyLog
) -> None:
    """Issue 17 item 7: health is per (pool, address); conf/wsproxy.yaml: no checks = healthy."""
    with trio.fail_after(15):
        (b,) = await start_backends(nursery, "b")
        b.fail_health = True  # its /healthz answers 503: the "checked" pool takes it DOWN
        checked = pool(b, name="checked", health=health(fall=1))
        unchecked = pool(b, name="unchecked")
        routes = (RouteConfig(path="/checked", pool=checked.name), RouteConfig(path="/", pool=unchecked.name))
        app, port = await start_proxy(nursery, config(checked, unchecked, routes=routes))
        await proxy_log.wait_for("event=health", "pool=checked", f"backend={b.address}", "state=down")
        assert (await visit(port, "/checked")).status == 503
        outcome = await visit(port, "/")
        assert (outcome.status, outcome.backend) == (101, "b"), outcome
        assert app.registry.health("unchecked", b.address).health is Health.UP


# -- 8. two proxies ------------------------------------------------------------------------------


async def test_two_proxies_agree_on_keys_and_accept_each_others_cookies(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        backends = await start_backends(nursery, "a", "b", "c")
        keyed = pool(*backends, name="keyed", sticky=StickyConfig(source="header", name="X-User"))
        pinned = pool(*backends, name="pinned", sticky=cookie_sticky())
        routes = (RouteConfig(path="/keyed", pool=PoolName("keyed")), RouteConfig(path="/pinned", pool=PoolName("pinned")))
        cfg = config(keyed, pinned, routes=routes)
        app1, port1 = await start_proxy(nursery, cfg)
        app2, port2 = await start_proxy(nursery, cfg)
        assert app1.registry is not app2.registry

        for i in range(20):
            user = [(b"X-User", f"user-{i}".encode())]
            one = (await visit(port1, "/keyed", user)).backend
            two = (await visit(port2, "/keyed", user)).backend
            assert one == two == home(backends, f"user-{i}".encode())

        # A cookie issued by one proxy pins on the other, both ways, for every backend.
        for issuer, other in ((port1, port2), (port2, port1)):
            for _ in range(3):
                got = await visit(issuer, "/pinned")
                assert got.cookie is not None
                elsewhere = [await visit(other, "/pinned", [cookie_header(got.cookie)]) for _ in range(5)]
                assert [o.backend for o in elsewhere] == [got.backend] * 5
                assert all(o.cookie in (None, got.cookie) for o in elsewhere)
