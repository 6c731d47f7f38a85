"""End to end: pools whose backends come from DNS (``pools.NAME.discovery``), over loopback.

A real authoritative DNS server (``tests/dnsserver.py``: dnslib, UDP and TCP,
answering from a table the test changes) sits on 127.0.0.1; the proxy runs
in-process and asks it with dnspython's async resolver, as in production.
Backends are trio-websocket servers that *name themselves* (a backend's first
message to each client is its address), on 127.0.0.2-127.0.0.4 with one port
(A records carry no port) or on 127.0.0.1 with one port each (SRV).

Covered: A and SRV answers flipped under load (no refused handshake, 1012 for the
sessions of the backend that left, within drain timeout + spread; the new
backend takes sessions after its health check and slow start), SRV priority
and weight, a truncated UDP answer retried over TCP, a failed lookup keeping
or emptying the set (logged and counted), TTLs honoured within [1s,
interval], a backend that comes back calling off its drain, and a reload that
keeps what DNS found. The decisions themselves are tested in
``tests/balance/test_discovery.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from functools import partial
from pathlib import Path
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, open_websocket_url, serve_websocket

from tests.dnsserver import DnsServer, Srv
from tests.kit.browser import Browser, needs_browser, with_browser
from tests.kit.servers import make_config, raw_request, start_proxy, status_of
from tests.kit.ws import UPGRADE_REQUEST
from wsproxy.app import App
from wsproxy.control import discovery
from wsproxy.control.admin import serve_admin
from wsproxy.control.discovery import DnsLookup, LookupFailed
from wsproxy.config.schema import (
    Address,
    AdminConfig,
    Config,
    DiscoveryConfig,
    DrainConfig,
    HealthConfig,
    PoolConfig,
    PoolName,
)

MAIN = PoolName("main")


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    server = DnsServer()
    try:
        yield server
    finally:
        server.stop()


async def named_backend(nursery: trio.Nursery, host: str = "127.0.0.1", port: int = 0) -> int:
    """A trio-websocket echo backend on host:port that first sends its own address; returns the port."""

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            await ws.send_message(f"{host}:{port_of[0]}")
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed:
            pass

    port_of = [port]
    server = await nursery.start(serve_websocket, handler, host, port, None)
    port_of[0] = int(server.port)
    return port_of[0]


async def a_backends(nursery: trio.Nursery, *hosts: str) -> int:
    """Backends on ``hosts`` (127.0.0.x), all on one port; returns it."""
    port = await named_backend(nursery, hosts[0])
    for host in hosts[1:]:
        await named_backend(nursery, host, port)
    return port


def discovering(
    dns: DnsServer,
    discovery: DiscoveryConfig,
    *,
    drain: DrainConfig | None = None,
    health: HealthConfig | None = None,
    slow_start_s: float = 0.0,
) -> Config:
    """A config whose pool "main" has no listed backend, only ``discovery`` (asking ``dns``)."""
    config = make_config([])
    discovery = dataclasses.replace(discovery, resolvers=(Address("127.0.0.1", dns.port),))
    pool = PoolConfig(
        name=MAIN, backends=(), discovery=discovery, health=health, slow_start_s=slow_start_s,
        drain=drain or DrainConfig(timeout_s=1.0, spread_s=1.0, close_timeout_s=2.0),
    )
    return dataclasses.replace(config, pools={MAIN: pool})


def backends_of(app: App) -> dict[str, dict[str, object]]:
    pools = app.status()["pools"]
    assert isinstance(pools, dict)
    return {b["address"]: b for b in pools["main"]["backends"]}


async def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    assert callable(predicate)
    with trio.move_on_after(timeout_s):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {timeout_s}s: {what}")


async def greeting(url: str) -> str:
    """Open a session, return the name of the backend that took it, close it normally."""
    with trio.fail_after(10):
        async with open_websocket_url(url) as ws:
            return str(await ws.get_message())


@dataclass
class Held:
    """One long-lived client: the backends it was on, and how each session ended."""

    backends: list[str] = field(default_factory=list)
    endings: list[tuple[str, int | None, float]] = field(default_factory=list)  # (backend, code, at)
    failures: list[str] = field(default_factory=list)


async def hold(url: str, held: Held, stop: trio.Event) -> None:
    """Keep a session open, echoing every 100 ms; when the proxy closes it, reconnect (as real clients do)."""
    while not stop.is_set():
        backend: str | None = None
        try:
            async with open_websocket_url(url, connect_timeout=10, disconnect_timeout=2) as ws:
                backend = str(await ws.get_message())
                held.backends.append(backend)
                try:
                    while not stop.is_set():
                        await ws.send_message("x")
                        if await ws.get_message() != "x":
                            held.failures.append("wrong echo")
                        await trio.sleep(0.1)
                except ConnectionClosed as exc:
                    held.endings.append((backend, exc.reason.code if exc.reason else None, trio.current_time()))
        except Exception as exc:  # a refused or failed handshake: the test wants none
            if backend is None:
                held.failures.append(repr(exc))
                await trio.sleep(0.1)


@pytest.mark.parametrize("kind", ["A", "SRV"])
async def test_answers_flipped_under_load(nursery: trio.Nursery, dns: DnsServer, kind: str) -> None:
    """30 held sessions and a stream of new ones; DNS moves the pool from .2,.3 to .3,.4 (A, or SRV targets)."""
    port = await a_backends(nursery, "127.0.0.2", "127.0.0.3", "127.0.0.4")
    old, kept, new = (f"127.0.0.{i}:{port}" for i in (2, 3, 4))

    def answer(*hosts: str) -> None:
        if kind == "A":
            dns.table.set("chat.test", "A", list(hosts))
        else:  # one SRV target per pod, its address in the additional section
            dns.table.set("chat.test", "SRV", [Srv(0, 10, port, f"pod-{h.rsplit('.', 1)[1]}.chat.test", h) for h in hosts])

    answer("127.0.0.2", "127.0.0.3")
    drain = DrainConfig(timeout_s=1.0, spread_s=1.0, close_timeout_s=2.0)
    question = DiscoveryConfig(dns="chat.test", type="A", port=port, interval_s=1.0) if kind == "A" else (
        DiscoveryConfig(dns="chat.test", type="SRV", interval_s=1.0)
    )
    config = discovering(
        dns, question, drain=drain, health=HealthConfig(type="tcp", interval_s=0.5, timeout_s=1.0), slow_start_s=1.5
    )
    app, proxy_port = await start_proxy(nursery, config)
    url = f"ws://127.0.0.1:{proxy_port}/"
    assert set(backends_of(app)) == {old, kept}  # the first lookup is done before the listeners open
    assert {b["source"] for b in backends_of(app).values()} == {"dns"}
    await wait_for(lambda: all(b["health"] == "up" for b in backends_of(app).values()), 5, "both backends up")

    stop = trio.Event()
    clients = [Held() for _ in range(30)]
    fresh: list[tuple[float, str]] = []
    fresh_failures: list[str] = []

    async def stream_of_new_sessions() -> None:
        while not stop.is_set():
            try:
                fresh.append((trio.current_time(), await greeting(url)))
            except Exception as exc:
                fresh_failures.append(repr(exc))
            await trio.sleep(0.03)

    async with trio.open_nursery() as load:
        for held in clients:
            load.start_soon(hold, url, held, stop)
        load.start_soon(stream_of_new_sessions)
        await wait_for(lambda: all(c.backends for c in clients), 10, "every client connected")
        on_old = sum(1 for c in clients if c.backends[0] == old)
        assert on_old >= 5  # round robin spread them over both
        flipped_at = trio.current_time()
        answer("127.0.0.3", "127.0.0.4")
        await wait_for(lambda: new in backends_of(app) and old not in backends_of(app), 3, "the flip seen")
        seen_at = trio.current_time()
        assert seen_at - flipped_at <= 1.0 + 1.0  # TTL 1 s (and interval 1 s), plus slack
        pools = app.status()["pools"]
        assert isinstance(pools, dict)
        assert [b["address"] for b in pools["main"]["removed"]] == [old]  # shown draining until it is done
        bound_s = drain.timeout_s + drain.spread_s + 1.5  # slack for a busy machine
        await wait_for(
            lambda: sum(1 for c in clients for e in c.endings if e[0] == old) >= on_old, bound_s + 1.0,
            "every session on the removed backend closed",
        )
        await trio.sleep(max(0.0, seen_at + 1.5 + 1.0 - trio.current_time()))  # past slow start, and one more second
        stop.set()

    endings = [e for c in clients for e in c.endings]
    assert [e for e in endings if e[0] != old] == []  # nobody else was closed
    assert {code for _, code, _ in endings} == {1012}
    assert max(at for *_, at in endings) - seen_at <= bound_s
    assert min(at for *_, at in endings) - seen_at >= drain.timeout_s - 0.1
    assert [f for c in clients for f in c.failures] == [] and fresh_failures == []  # 0 refused handshakes
    assert all(c.backends[-1] in (kept, new) for c in clients)  # the reconnected ones found the new set
    after = Counter(b for t, b in fresh if t >= seen_at + 0.5)
    assert old not in after
    late = Counter(b for t, b in fresh if t >= seen_at + 1.5 + 0.5)  # slow start done
    assert late[new] >= 0.25 * sum(late.values()), late
    assert app.status()["pools"]["main"]["removed"] == []  # type: ignore[index]


async def test_srv_priority_and_weight(nursery: trio.Nursery, dns: DnsServer) -> None:
    """Weights 3:1 within priority 10; priority 20 only when no backend of 10 is available."""
    one, two, backup = [await named_backend(nursery) for _ in range(3)]
    dns.table.set("_ws._tcp.chat.test", "SRV", [
        Srv(10, 3, one, "one.chat.test"),
        Srv(10, 1, two, "two.chat.test", address=None),  # not in the additional section: looked up
        Srv(20, 5, backup, "backup.chat.test"),
    ])
    dns.table.set("two.chat.test", "A", ["127.0.0.1"])
    config = discovering(dns, DiscoveryConfig(dns="_ws._tcp.chat.test", type="SRV", interval_s=5.0))
    app, proxy_port = await start_proxy(nursery, config)
    url = f"ws://127.0.0.1:{proxy_port}/"
    found = backends_of(app)
    assert {a: (b["priority"], b["weight"]) for a, b in found.items()} == {
        f"127.0.0.1:{one}": (10, 3), f"127.0.0.1:{two}": (10, 1), f"127.0.0.1:{backup}": (20, 5)
    }
    assert dns.table.count("two.chat.test", "A") >= 1 and dns.table.count("one.chat.test", "A") == 0
    got = Counter([await greeting(url) for _ in range(40)])
    assert got == {f"127.0.0.1:{one}": 30, f"127.0.0.1:{two}": 10}
    assert app.drain_backend("main", f"127.0.0.1:{one}") and app.drain_backend("main", f"127.0.0.1:{two}")
    assert Counter([await greeting(url) for _ in range(5)]) == {f"127.0.0.1:{backup}": 5}
    assert app.undrain_backend("main", f"127.0.0.1:{two}")
    assert Counter([await greeting(url) for _ in range(5)]) == {f"127.0.0.1:{two}": 5}


async def test_a_truncated_udp_answer_is_asked_again_over_tcp(nursery: trio.Nursery, dns: DnsServer) -> None:
    many = [f"127.0.1.{i}" for i in range(1, 61)]  # 60 A records: about 1 KiB, over UDP's 512 bytes
    dns.table.set("many.test", "A", many)
    app, _ = await start_proxy(nursery, discovering(dns, DiscoveryConfig(dns="many.test", type="A", port=9000)))
    assert set(backends_of(app)) == {f"{ip}:9000" for ip in many}
    assert dns.table.count("many.test", "A", "udp") >= 1 and dns.table.count("many.test", "A", "tcp") >= 1


async def test_a_failed_lookup_keeps_the_set_or_empties_it(
    nursery: trio.Nursery, dns: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.control.discovery")
    port = await a_backends(nursery, "127.0.0.2")
    dns.table.set("chat.test", "A", ["127.0.0.2"])
    config = discovering(dns, DiscoveryConfig(dns="chat.test", type="A", port=port, interval_s=1.0))
    app, proxy_port = await start_proxy(nursery, config)
    url = f"ws://127.0.0.1:{proxy_port}/"
    backend = f"127.0.0.2:{port}"
    dns.table.mode = "servfail"
    await wait_for(lambda: app.discovery.failures_total.get(MAIN, 0) >= 2, 5, "two failed lookups")
    assert list(backends_of(app)) == [backend]
    assert await greeting(url) == backend
    dns.table.mode = "drop"
    before = app.discovery.failures_total[MAIN]
    await wait_for(lambda: app.discovery.failures_total[MAIN] > before, 5, "a lookup that timed out")
    assert list(backends_of(app)) == [backend]
    lines = [r.getMessage() for r in caplog.records if "event=discovery_failed" in r.getMessage()]
    assert any(f"reason=\"no server answered: 127.0.0.1:{dns.port} SERVFAIL\"" in line for line in lines), lines
    assert any('reason="timed out after' in line for line in lines), lines
    assert all("action=kept_last_set backends=1" in line for line in lines)
    _, body = app.render_metrics()
    failures = app.discovery.failures_total[MAIN]
    assert f'wsproxy_discovery_failures_total{{pool="main"}} {failures:.1f}'.encode() in body
    assert b'wsproxy_discovered_backends{pool="main"} 1.0' in body
    status = app.status()["pools"]["main"]["discovery"]  # type: ignore[index]
    assert status["last_error"] is not None and status["failures"] >= 3  # type: ignore[index]

    # The same question with on_error: empty: a reload keeps the set, the next failure empties it.
    pool = config.pools[MAIN]
    assert pool.discovery is not None
    emptying = dataclasses.replace(pool.discovery, on_error="empty")
    app.reload(dataclasses.replace(config, pools={MAIN: dataclasses.replace(pool, discovery=emptying)}))
    assert list(backends_of(app)) == [backend]  # carried over by the reload
    await wait_for(lambda: backends_of(app) == {}, 5, "the set emptied")
    assert any("action=emptied" in r.getMessage() for r in caplog.records)
    refused = await raw_request(proxy_port, UPGRADE_REQUEST)
    assert status_of(refused) == 503 and refused.endswith(b"no backend available in pool main\n")
    dns.table.mode = "answer"
    await wait_for(lambda: list(backends_of(app)) == [backend], 5, "the set back")
    assert await greeting(url) == backend


async def test_without_resolvers_the_systems_are_asked_and_none_is_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.internal\noptions ndots:2\n")  # no nameserver line
    monkeypatch.setattr(discovery, "RESOLV_CONF", str(conf))
    with pytest.raises(LookupFailed) as info:
        await DnsLookup(DiscoveryConfig(dns="chat", type="A", port=9000)).lookup()
    assert info.value.reason.startswith("no resolver configured")


async def test_ttls_are_honoured_within_one_second_and_the_interval(nursery: trio.Nursery, dns: DnsServer) -> None:
    dns.table.set("chat.test", "A", ["127.0.0.2"])
    dns.table.ttl = 0  # asks for a lookup at every use: the floor (1 s) applies
    await start_proxy(nursery, discovering(dns, DiscoveryConfig(dns="chat.test", type="A", port=9000, interval_s=2.0)))
    await trio.sleep(3.3)
    dns.table.ttl = 3600  # longer than the interval: the interval (2 s) applies
    mark = trio.current_time()
    await trio.sleep(1.2)  # the lookup already planned with TTL 0 happens meanwhile
    times = dns.table.times("chat.test", "A")
    fast = [b - a for a, b in zip(times, times[1:])]
    assert len(fast) >= 3 and all(0.95 <= gap <= 1.5 for gap in fast[:3]), fast
    count = len(times)
    await trio.sleep(4.5)
    slow_times = dns.table.times("chat.test", "A")[count - 1 :]
    slow = [b - a for a, b in zip(slow_times, slow_times[1:])]
    assert len(slow) >= 2 and all(1.95 <= gap <= 2.6 for gap in slow), (slow, mark)


async def test_a_backend_that_comes_back_calls_off_its_drain(nursery: trio.Nursery, dns: DnsServer) -> None:
    port = await a_backends(nursery, "127.0.0.2", "127.0.0.3")
    dns.table.set("chat.test", "A", ["127.0.0.2", "127.0.0.3"])
    drain = DrainConfig(timeout_s=2.5, spread_s=0.5, close_timeout_s=2.0)
    app, proxy_port = await start_proxy(
        nursery, discovering(dns, DiscoveryConfig(dns="chat.test", type="A", port=port, interval_s=1.0), drain=drain)
    )
    url = f"ws://127.0.0.1:{proxy_port}/"
    stop = trio.Event()
    clients = [Held() for _ in range(6)]
    async with trio.open_nursery() as load:
        for held in clients:
            load.start_soon(hold, url, held, stop)
        await wait_for(lambda: all(c.backends for c in clients), 10, "every client connected")
        dns.table.set("chat.test", "A", ["127.0.0.3"])
        await wait_for(lambda: app.status()["pools"]["main"]["removed"] != [], 3, "the drain started")  # type: ignore[index]
        dns.table.set("chat.test", "A", ["127.0.0.2", "127.0.0.3"])
        await wait_for(lambda: f"127.0.0.2:{port}" in backends_of(app), 3, "back in the pool")
        assert app.status()["pools"]["main"]["removed"] == []  # type: ignore[index]
        await trio.sleep(drain.timeout_s + drain.spread_s + 0.5)
        stop.set()
    assert [c.endings for c in clients] == [[] for _ in clients]  # nobody was closed
    assert [f for c in clients for f in c.failures] == []
    assert sum(1 for c in clients if c.backends == [f"127.0.0.2:{port}"]) >= 2


async def test_a_reload_keeps_the_found_set_and_a_new_question_replaces_it(
    nursery: trio.Nursery, dns: DnsServer
) -> None:
    dns.table.set("chat.test", "A", ["127.0.0.2"])
    dns.table.set("other.test", "A", ["127.0.0.3"])
    config = discovering(dns, DiscoveryConfig(dns="chat.test", type="A", port=9000, interval_s=5.0))
    app, _ = await start_proxy(nursery, config)
    assert list(backends_of(app)) == ["127.0.0.2:9000"]
    app.reload(dataclasses.replace(config, timeouts=dataclasses.replace(config.timeouts, idle_s=60.0)))
    assert app.generation.number == 2
    assert list(backends_of(app)) == ["127.0.0.2:9000"]  # at once: no lookup needed, nothing drains
    assert app.status()["pools"]["main"]["removed"] == []  # type: ignore[index]
    pool = config.pools[MAIN]
    assert pool.discovery is not None
    other = dataclasses.replace(pool.discovery, dns="other.test")
    app.reload(dataclasses.replace(config, pools={MAIN: dataclasses.replace(pool, discovery=other)}))
    await wait_for(lambda: list(backends_of(app)) == ["127.0.0.3:9000"], 3, "the new question's answer")


@needs_browser
@pytest.mark.timeout(120)
async def test_the_status_page_shows_found_backends_and_one_that_left(nursery: trio.Nursery, dns: DnsServer) -> None:
    """In Chromium: "dns" beside found backends; one that left the answer stays, draining, until it is back."""
    port = await a_backends(nursery, "127.0.0.2", "127.0.0.3")
    left, stays = f"127.0.0.2:{port}", f"127.0.0.3:{port}"
    dns.table.set("chat.test", "A", ["127.0.0.2", "127.0.0.3"])
    config = discovering(
        dns, DiscoveryConfig(dns="chat.test", type="A", port=port, interval_s=1.0),
        drain=DrainConfig(timeout_s=60.0, spread_s=1.0),  # long enough to look at
    )
    app, proxy_port = await start_proxy(nursery, config)
    url = f"ws://127.0.0.1:{proxy_port}/"
    stop = trio.Event()
    clients = [Held() for _ in range(4)]
    for held in clients:
        nursery.start_soon(hold, url, held, stop)
    await wait_for(lambda: all(c.backends for c in clients), 10, "every client connected")
    admin = await nursery.start(serve_admin, app, AdminConfig(bind=Address("127.0.0.1", 0)))

    def steps(browser: Browser) -> None:
        from playwright.sync_api import expect  # installed: needs_browser says so

        page = browser.page
        for backend in (left, stays):
            expect(browser.state(backend)).to_have_text("up")
            expect(browser.row(backend).locator("td.addr")).to_contain_text("dns")
        trio.from_thread.run_sync(dns.table.set, "chat.test", "A", ["127.0.0.3"])
        expect(browser.state(left)).to_have_text("draining", timeout=4000)
        expect(browser.row(left).locator("td.addr")).to_contain_text("left the pool")
        expect(browser.row(left).locator("button.drain")).to_be_hidden()
        expect(page.locator("#events")).to_contain_text(f"{left}: up → draining")
        browser.screenshot("status-page-discovery.png")
        trio.from_thread.run_sync(dns.table.set, "chat.test", "A", ["127.0.0.2", "127.0.0.3"])
        expect(browser.state(left)).to_have_text("up", timeout=4000)
        expect(browser.row(left).locator("td.addr")).not_to_contain_text("left the pool")
        expect(browser.row(left).locator("button.drain")).to_be_visible()
        assert browser.errors == [], browser.errors

    await trio.to_thread.run_sync(partial(with_browser, f"http://{admin}/", steps, viewport={"width": 1280, "height": 800}))
    stop.set()
    assert [c.endings for c in clients] == [[] for _ in clients]  # the drain was called off: nobody closed
