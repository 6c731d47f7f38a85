"""Active health checks against real backends on loopback.

``check_backend`` is driven against each kind of backend a check has to judge:
a good one, a closed port, one that accepts TCP and then says nothing, one
that answers 503, one that upgrades and then ignores frames, one that hangs
up. ``HealthChecker`` is driven through whole lives of backends: first pass,
killed, restarted on the same port, added and removed by a reload. Intervals
are 0.1 s, so the timing assertions are in intervals, with the ±10% jitter
and a scheduler tick of slack. What is not here: the rise/fall arithmetic and
passive ejection (``test_registry``, pure).
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from tests.kit.servers import closed_port, start_tcp_backend, start_ws_backend
from tests.kit.wait import SLACK_S, until
from wsproxy.config.schema import Address, BackendConfig, HealthConfig, PoolConfig, PoolName
from wsproxy.control.health import HealthChecker, check_backend
from wsproxy.balance.registry import Health, Registry

INTERVAL_S = 0.1
#: Scheduler and loopback slack on top of a count of intervals: the kit's one slack, but never more
#: than half an interval, or a check that came one interval late would pass.
TICK_SLACK_S = min(SLACK_S, INTERVAL_S / 2)


def local(port: int) -> Address:
    return Address("127.0.0.1", port)


def health(type: str = "websocket", **changes: object) -> HealthConfig:
    settings: dict[str, object] = {"type": type, "interval_s": INTERVAL_S, "timeout_s": 0.5, "rise": 2, "fall": 3}
    settings.update(changes)
    return HealthConfig(**settings)  # type: ignore[arg-type]


def pool(*ports: int, check: HealthConfig | None) -> PoolConfig:
    return PoolConfig(
        name=PoolName("chat"),
        backends=tuple(BackendConfig(address=local(port)) for port in ports),
        health=check,
    )


@pytest.fixture(autouse=True)
def _health_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture wsproxy.control.health at INFO, even after a test called wsproxy.log.configure()."""
    monkeypatch.setattr(logging.getLogger("wsproxy"), "propagate", True)
    caplog.set_level(logging.INFO, logger="wsproxy.control.health")


def health_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "wsproxy.control.health"]


# --- backends -----------------------------------------------------------------


async def read_head(stream: trio.SocketStream) -> bytes:
    """Read one HTTP request head; b"" if the client went away first."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        try:
            chunk = await stream.receive_some(4096)
        except trio.BrokenResourceError:
            return b""
        if not chunk:
            return b""
        buffer += chunk
    return buffer


def http_backend(answer: bytes, heads: list[bytes] | None = None) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A raw HTTP backend: read the request head, send ``answer``, close."""

    async def handler(stream: trio.SocketStream) -> None:
        head = await read_head(stream)
        if heads is not None:
            heads.append(head)
        try:
            await stream.send_all(answer)
        except trio.BrokenResourceError:
            pass

    return handler


async def silent(stream: trio.SocketStream) -> None:
    """Accepts the connection, reads nothing, answers nothing."""
    await trio.sleep_forever()


async def hang_up(stream: trio.SocketStream) -> None:
    """Reads the request, then closes without a word."""
    await read_head(stream)


def wsproto_backend(
    after_upgrade: Callable[[trio.SocketStream, WSConnection], Awaitable[None]],
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """A raw backend that completes the upgrade with wsproto, then runs ``after_upgrade``."""

    async def handler(stream: trio.SocketStream) -> None:
        conn = WSConnection(ConnectionType.SERVER)
        conn.receive_data(await read_head(stream))
        for event in conn.events():
            if isinstance(event, Request):
                await stream.send_all(conn.send(AcceptConnection()))
                await after_upgrade(stream, conn)
                return

    return handler


async def ignore_frames(stream: trio.SocketStream, conn: WSConnection) -> None:
    """Reads and drops every frame: pings included."""
    while await stream.receive_some(4096):
        pass


async def going_away(stream: trio.SocketStream, conn: WSConnection) -> None:
    await stream.send_all(conn.send(CloseConnection(code=1001)))


async def eof_after_upgrade(stream: trio.SocketStream, conn: WSConnection) -> None:
    pass  # the handler returns: trio closes the connection


async def chatty(stream: trio.SocketStream, conn: WSConnection) -> None:
    """Sends a message, an unsolicited pong and a ping of its own before it answers the ping."""
    await stream.send_all(conn.send(TextMessage(data="welcome")))
    await stream.send_all(b"\x8a\x03abc")  # unsolicited pong (RFC 6455 §5.5.3), unmasked server frame
    await stream.send_all(conn.send(Ping(payload=b"srv")))
    answered_ours = False
    while data := await stream.receive_some(4096):
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, Ping):
                await stream.send_all(conn.send(event.response()))
            elif isinstance(event, CloseConnection):
                await stream.send_all(conn.send(event.response()))
                return
            answered_ours = True
    assert answered_ours


@dataclass
class WsBackend:
    """A trio-websocket backend that can be killed and restarted on the same port."""

    port: int = 0
    accepted: list[float] = field(default_factory=list)  # trio time of every upgrade
    paths: list[str] = field(default_factory=list)
    user_agents: list[bytes] = field(default_factory=list)
    scope: trio.CancelScope | None = None

    async def start(self, nursery: trio.Nursery) -> int:
        self.port = await nursery.start(self._serve)
        return self.port

    def kill(self) -> None:
        assert self.scope is not None
        self.scope.cancel()

    async def _serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as self.scope:
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")  # SO_REUSEADDR: same port again
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(WebSocketServer(self._handle, listeners).run)
                    task_status.started(listeners[0].socket.getsockname()[1])
            finally:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)

    async def _handle(self, request: WebSocketRequest) -> None:
        self.accepted.append(trio.current_time())
        self.paths.append(request.path)
        self.user_agents += [value for name, value in request.headers if name.lower() == b"user-agent"]
        ws = await request.accept()
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed:
            pass


@contextmanager
def full_backlog() -> Iterator[int]:
    """A listening port whose accept queue is full: the kernel drops new SYNs, so connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            try:
                filler.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# --- check_backend ----------------------------------------------------------------

OK_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
UNAVAILABLE_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"


async def check(port: int, config: HealthConfig) -> tuple[bool, str, float | None]:
    """check_backend, asserting it kept its time budget."""
    started = trio.current_time()
    with trio.fail_after(config.timeout_s + 1):
        result = await check_backend(local(port), config)
    assert trio.current_time() - started <= config.timeout_s + SLACK_S
    return result


@pytest.mark.parametrize("type", ["tcp", "http", "websocket"])
async def test_refused_port(type: str) -> None:
    assert await check(closed_port(), health(type)) == (False, "connect refused", None)


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs to a full accept queue")
@pytest.mark.parametrize("type", ["tcp", "http", "websocket"])
async def test_connect_that_hangs_is_a_connect_timeout(type: str) -> None:
    with full_backlog() as port:
        assert await check(port, health(type, timeout_s=0.3)) == (False, "connect timed out", None)


@contextmanager
def out_of_descriptors() -> Iterator[None]:
    """This process really out of file descriptors: the soft limit lowered, then every free one taken."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.skipif(sys.platform != "linux", reason="counts descriptors in /proc/self/fd")
async def test_the_proxy_out_of_descriptors_is_unknown_not_a_failure(nursery: trio.Nursery) -> None:
    """EMFILE on the check's own socket says nothing about the backend: not recorded, never down."""
    port = await start_ws_backend(nursery)
    registry = Registry()
    backend = BackendConfig(address=local(port))
    pool = PoolConfig(name=PoolName("p"), backends=(backend,), health=health("tcp", interval_s=0.05, fall=1))
    with out_of_descriptors():
        ok, reason, rtt_s = await check_backend(local(port), health("tcp"))
        assert (ok, rtt_s) == (None, None)
        assert reason.startswith("proxy out of file descriptors"), reason
        checker = HealthChecker(pool, registry)
        async with trio.open_nursery() as checks:
            await checks.start(checker.run)
            await trio.sleep(0.3)  # about six checks, all without a descriptor
            checks.cancel_scope.cancel()
    state = registry.health("p", local(port))
    assert state.health is Health.UNKNOWN, state.health


async def test_tcp_passes_on_any_listener_and_times_the_connect(nursery: trio.Nursery) -> None:
    port = await start_ws_backend(nursery)
    ok, reason, rtt_s = await check(port, health("tcp"))
    assert (ok, reason) == (True, "ok")
    assert rtt_s is not None and 0 <= rtt_s < 0.5


async def test_tcp_passes_a_backend_that_never_answers(nursery: trio.Nursery) -> None:
    """Documented limit: the kernel accepts for a hung process; only http/websocket checks see it."""
    port = await start_tcp_backend(nursery, silent)
    ok, reason, _ = await check(port, health("tcp"))
    assert (ok, reason) == (True, "ok")


async def test_http_ok_and_the_request_it_sends(nursery: trio.Nursery) -> None:
    heads: list[bytes] = []
    port = await start_tcp_backend(nursery, http_backend(OK_200, heads))
    ok, reason, rtt_s = await check(port, health("http", path="/status"))
    assert (ok, reason) == (True, "ok") and rtt_s is not None and rtt_s >= 0
    request_line, *header_lines = heads[0].decode().split("\r\n")
    assert request_line == "GET /status HTTP/1.1"
    headers = {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines if h)}
    assert headers == {"host": f"127.0.0.1:{port}", "connection": "close", "user-agent": "wsproxy-health"}


async def test_http_status_not_expected(nursery: trio.Nursery) -> None:
    port = await start_tcp_backend(nursery, http_backend(UNAVAILABLE_503))
    assert await check(port, health("http")) == (False, "status 503", None)


async def test_http_expect_status_list_and_informational_responses(nursery: trio.Nursery) -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    port = await start_tcp_backend(nursery, http_backend(answer))
    assert (await check(port, health("http", expect_status=(200, 204))))[:2] == (True, "ok")
    assert await check(port, health("http")) == (False, "status 204", None)


async def test_http_silent_backend_times_out(nursery: trio.Nursery) -> None:
    port = await start_tcp_backend(nursery, silent)
    assert await check(port, health("http", timeout_s=0.3)) == (False, "timed out after 0.3s", None)


async def test_http_hang_up_and_garbage(nursery: trio.Nursery) -> None:
    port = await start_tcp_backend(nursery, hang_up)
    assert await check(port, health("http")) == (False, "connection closed", None)
    port = await start_tcp_backend(nursery, http_backend(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    ok, reason, _ = await check(port, health("http"))
    assert not ok and reason.startswith("invalid response: ")


async def test_websocket_ok_on_path_with_rtt(nursery: trio.Nursery) -> None:
    backend = WsBackend()
    port = await backend.start(nursery)
    ok, reason, rtt_s = await check(port, health("websocket", path="/healthz"))
    assert (ok, reason) == (True, "ok")
    assert rtt_s is not None and 0 < rtt_s < 0.5
    assert backend.paths == ["/healthz"]
    assert backend.user_agents == [b"wsproxy-health"]


async def test_websocket_against_the_shared_echo_backend(nursery: trio.Nursery) -> None:
    port = await start_ws_backend(nursery)
    assert (await check(port, health("websocket")))[:2] == (True, "ok")


async def test_websocket_upgrade_refused(nursery: trio.Nursery) -> None:
    async def not_found(request: WebSocketRequest) -> None:
        await request.reject(404, body=b"no such path")

    port = await start_ws_backend(nursery, not_found)
    assert await check(port, health("websocket")) == (False, "upgrade refused: status 404", None)
    port = await start_tcp_backend(nursery, http_backend(UNAVAILABLE_503))
    assert await check(port, health("websocket")) == (False, "upgrade refused: status 503", None)


async def test_websocket_silent_backend_times_out(nursery: trio.Nursery) -> None:
    port = await start_tcp_backend(nursery, silent)
    assert await check(port, health("websocket", timeout_s=0.3)) == (False, "timed out after 0.3s", None)


async def test_websocket_no_pong(nursery: trio.Nursery) -> None:
    port = await start_tcp_backend(nursery, wsproto_backend(ignore_frames))
    assert await check(port, health("websocket", timeout_s=0.3)) == (False, "no pong within 0.3s", None)


async def test_websocket_connection_closed(nursery: trio.Nursery) -> None:
    port = await start_tcp_backend(nursery, hang_up)  # before the 101
    assert await check(port, health("websocket")) == (False, "connection closed", None)
    port = await start_tcp_backend(nursery, wsproto_backend(eof_after_upgrade))  # after the 101, no close frame
    assert await check(port, health("websocket")) == (False, "connection closed", None)
    port = await start_tcp_backend(nursery, wsproto_backend(going_away))  # a close frame instead of the pong
    assert await check(port, health("websocket")) == (False, "connection closed with 1001", None)


async def test_websocket_pong_after_other_frames(nursery: trio.Nursery) -> None:
    port = await start_tcp_backend(nursery, wsproto_backend(chatty))
    ok, reason, rtt_s = await check(port, health("websocket"))
    assert (ok, reason) == (True, "ok") and rtt_s is not None


# --- HealthChecker -----------------------------------------------------------------


async def test_unknown_until_the_first_pass_then_up(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    port = await WsBackend().start(nursery)
    registry = Registry()
    checker = HealthChecker(pool(port, check=health(rise=3)), registry)
    with trio.fail_after(5):
        await nursery.start(checker.run)
        state = registry.health("chat", local(port))
        assert state.health is Health.UNKNOWN  # started() comes before the first result
        await until(lambda: state.health is not Health.UNKNOWN, poll_s=0.002, what="state.health is not Health.UNKNOWN")
    assert state.health is Health.UP and state.passes == 1  # the first pass, not `rise` of them
    assert state.rtt_s is not None and state.last_check == "ok"
    assert health_lines(caplog) == [
        f"event=health pool=chat backend=127.0.0.1:{port} state=up reason=\"1 consecutive passes\" was=unknown"
    ]


async def test_killed_backend_leaves_rotation_after_fall_and_returns_after_rise(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    rise, fall = 2, 3
    backend = WsBackend()
    port = await backend.start(nursery)
    registry = Registry()
    state = registry.health("chat", local(port))
    await nursery.start(HealthChecker(pool(port, check=health(rise=rise, fall=fall)), registry).run)
    with trio.fail_after(5):
        await until(lambda: state.health is Health.UP, poll_s=0.002, what="state.health is Health.UP")
        await trio.sleep(INTERVAL_S / 2)  # kill somewhere between two checks

        killed_at = trio.current_time()
        backend.kill()
        down_after = await until(lambda: state.health is Health.DOWN, poll_s=0.002, what="state.health is Health.DOWN") - killed_at

        await trio.sleep(INTERVAL_S / 2)
        restarted_at = trio.current_time()
        assert await backend.start(nursery) == port
        up_after = await until(lambda: state.health is Health.UP, poll_s=0.002, what="state.health is Health.UP") - restarted_at

    print(f"\nleft rotation {down_after:.3f}s after the kill; back {up_after:.3f}s after the restart")
    assert (fall - 1) * INTERVAL_S * 0.9 <= down_after <= (fall + 1) * INTERVAL_S * 1.1 + TICK_SLACK_S
    assert (rise - 1) * INTERVAL_S * 0.9 <= up_after <= (rise + 1) * INTERVAL_S * 1.1 + TICK_SLACK_S
    backend_name = f"127.0.0.1:{port}"
    assert health_lines(caplog) == [
        f"event=health pool=chat backend={backend_name} state=up reason=\"1 consecutive passes\" was=unknown",
        f"event=health pool=chat backend={backend_name} state=down"
        " reason=\"3 consecutive failures: connect refused\" was=up",
        f"event=health pool=chat backend={backend_name} state=up reason=\"2 consecutive passes\" was=down",
    ]


async def test_websocket_checks_catch_a_backend_that_never_upgrades(nursery: trio.Nursery) -> None:
    port = await start_tcp_backend(nursery, silent)
    registry = Registry()
    state = registry.health("chat", local(port))
    await nursery.start(HealthChecker(pool(port, check=health(timeout_s=0.2, fall=2)), registry).run)
    with trio.fail_after(5):
        await until(lambda: state.health is not Health.UNKNOWN, poll_s=0.002, what="state.health is not Health.UNKNOWN")
    assert state.health is Health.DOWN and state.last_check == "timed out after 0.2s"

    tcp_registry = Registry()  # the same backend passes a tcp check
    tcp_state = tcp_registry.health("chat", local(port))
    await nursery.start(HealthChecker(pool(port, check=health("tcp")), tcp_registry).run)
    with trio.fail_after(5):
        await until(lambda: tcp_state.health is not Health.UNKNOWN, poll_s=0.002, what="tcp_state.health is not Health.UNKNOWN")
    assert tcp_state.health is Health.UP


async def test_start_healthy(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    good = await WsBackend().start(nursery)
    dead = closed_port()
    registry = Registry()
    checker = HealthChecker(pool(good, dead, check=health(start_healthy=True, fall=2)), registry)
    with trio.fail_after(5):
        await nursery.start(checker.run)
        started_at = trio.current_time()
        assert registry.health("chat", local(good)).health is Health.UP
        assert registry.health("chat", local(dead)).health is Health.UP  # before any check
        down_after = await until(lambda: registry.health("chat", local(dead)).health is Health.DOWN, poll_s=0.002, what="the dead backend DOWN") - started_at
    assert down_after <= 2 * INTERVAL_S * 1.1 + TICK_SLACK_S  # fall=2: at once, then one interval
    assert registry.health("chat", local(good)).health is Health.UP and registry.health("chat", local(good)).last_check == "ok"
    lines = health_lines(caplog)
    assert f"event=health pool=chat backend=127.0.0.1:{dead} state=up reason=start_healthy was=unknown" in lines
    assert (
        f"event=health pool=chat backend=127.0.0.1:{dead} state=down reason=\"2 consecutive failures: connect refused\""
        " was=up" in lines
    )


async def test_start_healthy_does_not_revive_a_known_down_backend(nursery: trio.Nursery) -> None:
    dead = closed_port()
    registry = Registry()
    registry.health("chat", local(dead)).record_check(False, "connect refused", 0.0, rise=1, fall=1)
    with trio.fail_after(5):
        await nursery.start(HealthChecker(pool(dead, check=health(start_healthy=True)), registry).run)
    assert registry.health("chat", local(dead)).health is Health.DOWN


async def test_slow_backend_does_not_delay_the_others(nursery: trio.Nursery) -> None:
    fast = WsBackend()
    fast_port = await fast.start(nursery)
    slow_port = await start_tcp_backend(nursery, silent)
    registry = Registry()
    slow = registry.health("chat", local(slow_port))
    slow_checks: list[float] = []
    await nursery.start(HealthChecker(pool(slow_port, fast_port, check=health(timeout_s=0.5)), registry).run)
    with trio.fail_after(5):
        while len(slow_checks) < 2:
            await until(lambda: slow.last_check_at is not None and slow.last_check_at not in slow_checks, poll_s=0.002, what="slow.last_check_at is not None and slow.last_check_at not in slow_checks")
            assert slow.last_check_at is not None
            slow_checks.append(slow.last_check_at)
    times = fast.accepted
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert slow.last_check == "timed out after 0.5s"
    assert slow_checks[1] - slow_checks[0] >= 0.5 + INTERVAL_S * 0.9  # timeout + interval
    assert len(times) >= 8  # ~1.1 s of checks at 0.1 s
    assert max(gaps) <= INTERVAL_S * 1.1 + TICK_SLACK_S, gaps
    assert registry.health("chat", local(fast_port)).health is Health.UP


async def test_update_adds_and_removes_backends(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    a, b = WsBackend(), WsBackend()
    port_a, port_b = await a.start(nursery), await b.start(nursery)
    registry = Registry()
    state_a, state_b = registry.health("chat", local(port_a)), registry.health("chat", local(port_b))
    checker = HealthChecker(pool(port_a, check=health()), registry)
    await nursery.start(checker.run)
    with trio.fail_after(5):
        await until(lambda: state_a.health is Health.UP, poll_s=0.002, what="state_a.health is Health.UP")
        checker.update(pool(port_b, check=health()))  # a removed, b added
        removed_at, checks_of_a = trio.current_time(), len(a.accepted)
        await until(lambda: state_b.health is Health.UP, poll_s=0.002, what="state_b.health is Health.UP")
        await trio.sleep(3 * INTERVAL_S)
        assert len(a.accepted) <= checks_of_a + 1  # at most the check that was in flight
        assert state_a.last_check_at is not None and state_a.last_check_at <= removed_at

        checks_of_b = len(b.accepted)
        checker.update(pool(port_a, port_b, check=health(interval_s=0.05)))  # a back; b keeps its loop
        last_a = state_a.last_check_at
        await until(lambda: state_a.last_check_at != last_a, poll_s=0.002, what="state_a.last_check_at != last_a")
        await trio.sleep(4 * INTERVAL_S)
        assert len(b.accepted) >= checks_of_b + 5  # b's loop picked up the shorter interval

        checker.update(pool(port_a, port_b, check=None))  # checks off: everything counts as up
        stopped_at = len(a.accepted) + len(b.accepted)
        state_b.record_check(False, "x", trio.current_time(), rise=1, fall=1)
        assert state_b.health is Health.DOWN
        checker.update(pool(port_a, port_b, check=None))
        assert state_b.health is Health.UP
        await trio.sleep(3 * INTERVAL_S)
        assert len(a.accepted) + len(b.accepted) <= stopped_at + 2

        checker.update(pool(port_b, check=health()))  # checks on again
        last_b = state_b.last_check_at
        await until(lambda: state_b.last_check_at != last_b, poll_s=0.002, what="state_b.last_check_at != last_b")
    assert f"event=health pool=chat backend=127.0.0.1:{port_b} state=up reason=\"no active checks\" was=down" in (
        health_lines(caplog)
    )


async def test_pool_without_checks(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    ports = (closed_port(), closed_port())
    registry = Registry()
    checker = HealthChecker(pool(*ports, check=None), registry)
    with trio.fail_after(1):
        await checker.run()  # returns at once
    assert all(registry.health("chat", local(p)).health is Health.UP for p in ports)
    assert health_lines(caplog) == [
        f"event=health pool=chat backend=127.0.0.1:{p} state=up reason=\"no active checks\" was=unknown" for p in ports
    ]
    third = closed_port()
    checker.update(pool(*ports, third, check=None))
    assert registry.health("chat", local(third)).health is Health.UP
    with pytest.raises(RuntimeError, match="after HealthChecker.run returned"):
        checker.update(pool(*ports, check=health()))


async def test_cancelling_run_stops_every_check(nursery: trio.Nursery) -> None:
    backend = WsBackend()
    port = await backend.start(nursery)
    registry = Registry()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as inner:
            await inner.start(HealthChecker(pool(port, check=health()), registry).run)
            with trio.fail_after(5):
                await until(lambda: len(backend.accepted) >= 2, poll_s=0.002, what="len(backend.accepted) >= 2")
            scope.cancel()
    checks = len(backend.accepted)
    await trio.sleep(3 * INTERVAL_S)
    assert len(backend.accepted) == checks
