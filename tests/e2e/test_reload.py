"""End-to-end tests of SIGHUP hot reload on a real ``wsproxy run`` process.

The proxy is ``python -m wsproxy run -c FILE`` in a subprocess; its stderr (the
log) goes to a file the test reads. Backends are trio-websocket echo servers in
the test process, clients are trio-websocket clients and raw ``ssl`` handshakes.
A reload is: write the new YAML (atomically, with ``os.replace``), send
``SIGHUP`` with ``os.kill``, and wait for the outcome line of that reload in the
log (``event=reloaded`` or ``action=kept_old_config``). The test never sends
the next SIGHUP before the previous reload is done: trio coalesces a signal
that arrives while the same one is still pending, and a reload would read a
file meant for the next one.

The admin API (``admin.bind``) gives ``/status`` (generation, backend state)
and ``/metrics`` (reload counters). Times compared with each other are all
taken in the test process (``trio.current_time()``); the proxy's own clock is
never compared with them.

The tests follow the reload contract: many reloads under load (1), broken
configs (2), a removed backend draining (3), listeners (4), certificates (5),
backend state (6), then the edges of draining and listeners (7).

What is not here: that a drain close falls on a frame boundary (the relay's
tests see frames; from outside, a close simply arrives between messages), the
reload of auth material (JWKS, token files), which ``test_auth.py`` covers
in-process, and systemd's ``RELOADING=1`` (``test_systemd_units.py``).
"""

from __future__ import annotations

import os
import random
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
import yaml
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from tests.kit.process import accepts, addr, make_config, pool, run_proxy
from tests.kit.servers import closed_port, start_backend, start_ws_backend
from tests.kit.wait import SLACK_S

# --- the proxy process --------------------------------------------------------------------------


def backend_status(status: dict[str, Any], pool_name: str, port: int) -> dict[str, Any]:
    for backend in status["pools"][pool_name]["backends"]:
        if backend["address"] == addr(port):
            return dict(backend)
    raise AssertionError(f"no backend {addr(port)} in pool {pool_name}: {status['pools']}")


# --- backends and clients -----------------------------------------------------------------------


async def echo(ws: WebSocketConnection, message: str) -> str:
    """Send ``message`` and return the answer (``NAME:message`` from a ``NamedBackend``)."""
    await ws.send_message(message)
    answer = await ws.get_message()
    assert isinstance(answer, str)
    return answer


async def which_backend(url: str, **kwargs: Any) -> str:
    """Open a session on ``url``, exchange one message, close; the name of the backend that served it."""
    async with open_websocket_url(url, **kwargs) as ws:
        return (await echo(ws, "who")).partition(":")[0]


# --- 1. many reloads under load -----------------------------------------------------------------

SESSIONS = 200
RELOADS = 50


@pytest.mark.timeout(180)
async def test_fifty_reloads_under_load_lose_nothing_and_leak_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    """200 sessions echo numbered messages and new sessions open every few ms through 50 SIGHUPs."""
    a = await start_ws_backend(nursery)
    b = await start_ws_backend(nursery)
    c = await start_ws_backend(nursery)
    port, admin_port = closed_port(), closed_port()
    base: dict[str, Any] = dict(
        listeners={"public": port}, pools={"main": pool(a, b)}, routes=[("/", "main")], admin_port=admin_port
    )
    with_other = make_config(
        **{**base, "pools": {"main": pool(a, b), "other": pool(c)}, "routes": [("/other", "other"), ("/", "main")]}
    )
    # reload n applies cycle[(n - 1) % 5]: pools and routes come and go, timeouts change, or nothing does
    cycle = [
        with_other,  # adds pool "other" and a route to it
        with_other,  # the same file again: nothing changes
        make_config(**base, timeouts={"handshake": "7s", "connect": "3s", "idle": "9m"}),  # "other" goes
        make_config(
            **{**base, "pools": {"main": pool(a, b), "spare": pool(c, retries=1)}, "routes": [("/spare", "spare"), ("/", "main")]},
            timeouts={"idle": "8m"},
        ),
        make_config(**base),  # "spare" goes, the timeouts are the defaults again
    ]
    url = f"ws://127.0.0.1:{port}/chat"
    problems: list[str] = []
    exchanged = [0] * SESSIONS
    opened = trio.Event()
    ready = 0
    stop = trio.Event()
    new_sessions = 0
    new_failures: list[str] = []

    async def session(index: int) -> None:
        nonlocal ready
        rng = random.Random(index)
        try:
            async with open_websocket_url(url) as ws:
                ready += 1
                if ready == SESSIONS:
                    opened.set()
                n = 0
                while True:
                    message = f"{index}:{n}"
                    answer = await echo(ws, message)
                    if answer != message:
                        problems.append(f"session {index}: sent {message!r}, got {answer!r}")
                        return
                    n += 1
                    exchanged[index] = n
                    if stop.is_set():
                        return  # closes normally (1000) on leaving the block
                    await trio.sleep(rng.uniform(0.05, 0.15))
        except (ConnectionClosed, OSError) as exc:
            problems.append(f"session {index} ended early after {exchanged[index]} messages: {exc!r}")

    inflight = 0
    paused = False  # no new attempts while the proxy's RSS and fds are measured

    async def new_session() -> None:
        nonlocal new_sessions, inflight
        inflight += 1
        try:
            with trio.fail_after(10):
                async with open_websocket_url(url) as ws:
                    if await echo(ws, "new") != "new":
                        new_failures.append("wrong echo")
            new_sessions += 1
        except Exception as exc:  # refused, reset, rejected, timed out: all count
            new_failures.append(repr(exc))
        finally:
            inflight -= 1

    async def open_new_sessions() -> None:
        """A new session every 5 ms, each on its own, until the end."""
        async with trio.open_nursery() as attempts:
            while not stop.is_set():
                if not paused:
                    attempts.start_soon(new_session)
                await trio.sleep(0.005)

    async def measure() -> tuple[int, int]:
        """The proxy's RSS (kB) and open fds with only the long sessions open."""
        nonlocal paused
        paused = True
        with trio.fail_after(10):
            while inflight:
                await trio.sleep(0.01)
        await trio.sleep(0.3)  # the last attempts' sockets close on the proxy's side too
        result = proxy.rss_kb(), proxy.fd_count()
        paused = False
        return result

    async with run_proxy(tmp_path, make_config(**base), ports=[port]) as proxy:
        with trio.fail_after(120):
            async with trio.open_nursery() as clients:
                for index in range(SESSIONS):
                    clients.start_soon(session, index)
                with trio.fail_after(30):
                    await opened.wait()
                clients.start_soon(open_new_sessions)
                rss: dict[int, int] = {}
                fds: dict[int, int] = {}
                started = trio.current_time()
                for number in range(1, RELOADS + 1):
                    sent_at = trio.current_time()
                    outcome = await proxy.reload(cycle[(number - 1) % len(cycle)])
                    assert f"event=reloaded generation={number + 1} " in outcome, outcome
                    if number in (5, RELOADS):
                        rss[number], fds[number] = await measure()
                    await trio.sleep(max(0.0, sent_at + random.uniform(0.05, 0.1) - trio.current_time()))
                    while new_sessions < 4 * number:  # paced by the new sessions too, not by the clock alone
                        await trio.sleep(0.01)  # (a loaded machine opens fewer per 0.1 s)
                reload_s = trio.current_time() - started
                await trio.sleep(0.3)  # a few more messages after the last reload
                stop.set()
            status = await proxy.status()
        log = proxy.log()
        print(
            f"\nreloads: {RELOADS} in {reload_s:.1f}s; RSS after 5: {rss[5]} kB, after {RELOADS}: {rss[RELOADS]} kB "
            f"(+{rss[RELOADS] - rss[5]} kB); fds {fds[5]} -> {fds[RELOADS]}; "
            f"messages {sum(exchanged)} (min {min(exchanged)} per session); new sessions {new_sessions}"
        )
        assert problems == [], problems[:10]
        assert new_failures == [], f"{len(new_failures)} new sessions failed (of {new_sessions}): {new_failures[:5]}"
        assert new_sessions >= 4 * RELOADS
        assert min(exchanged) >= 20, "sessions were not exchanging continuously"
        assert len(re.findall(r"event=reloaded ", log)) == RELOADS
        assert "event=reload_failed" not in log
        assert status["generation"] == RELOADS + 1
        assert status["reloads"] == RELOADS and status["reload_failures"] == 0
        assert rss[RELOADS] - rss[5] <= 4096, f"RSS grew from {rss[5]} kB to {rss[RELOADS]} kB"
        assert fds[RELOADS] == fds[5], f"open fds went from {fds[5]} to {fds[RELOADS]}"
        proxy.assert_clean()


# --- 2. broken configs ----------------------------------------------------------------------------

#: One error of a refused reload, as ``repr()`` quotes it (double quotes when the message holds a single one).
RELOAD_FAILED = re.compile(r"""event=reload_failed error=(?P<q>['"])(?P<file>[^'":]+):(?P<line>\d+):(?P<col>\d+): (?P<rest>.*)(?P=q)$""", re.M)


def good_yaml(port: int, backend: int, admin_port: int, *, new_route: bool = False) -> str:
    extra = "  - path: /new\n    pool: main\n" if new_route else ""
    return (
        "listeners:\n"
        "  - name: public\n"
        f"    bind: 127.0.0.1:{port}\n"
        "routes:\n"
        f"{extra}"
        "  - path: /old\n"
        "    pool: main\n"
        "pools:\n"
        "  main:\n"
        "    backends:\n"
        f"      - address: 127.0.0.1:{backend}\n"
        "admin:\n"
        f"  bind: 127.0.0.1:{admin_port}\n"
        "shutdown:\n"
        "  timeout: 1s\n"
        "  spread: 0s\n"
    )


async def test_a_broken_config_keeps_the_old_one_serving(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, "A")
    port, admin_port = closed_port(), closed_port()
    good = good_yaml(port, backend.port, admin_port)
    config = yaml.safe_load(good)
    with trio.fail_after(40):
        async with run_proxy(tmp_path, config, ports=[port]) as proxy:
            name = str(proxy.config_path)
            async with open_websocket_url(f"ws://127.0.0.1:{port}/old") as established:
                assert await echo(established, "before") == "A:before"
                lines = good.splitlines()
                syntax = "\n".join(lines[:4]) + "\n  - path: [/old\n    pool: main\n" + "\n".join(lines[6:]) + "\n"
                unknown = good.replace("    pool: main\n", "    pool: main\n    pol: main\n").replace(
                    "  main:\n", "  main:\n    retries: 99\n"
                )
                missing = good.replace(
                    "    bind: 127.0.0.1:",
                    f"    tls:\n      cert: {tmp_path / 'missing.pem'}\n      key: {tmp_path / 'missing.key'}\n    bind: 127.0.0.1:",
                )
                cases = [
                    ("syntax error", syntax, {(6, 9)}),  # "[/old" is never closed: the ":" after "pool"
                    ("unknown key and a bad value", unknown, {(7, 5), (10, 14)}),  # key "pol"; value 99
                    ("missing certificate and key", missing, {(4, 13), (5, 12)}),  # each at its own key
                ]
                for failures, (what, text, positions) in enumerate(cases, start=1):
                    outcome = await proxy.reload(text)
                    errors = [m for m in map(RELOAD_FAILED.search, outcome.splitlines()) if m]
                    found = {(int(m["line"]), int(m["col"])) for m in errors}
                    assert found == positions and all(m["file"] == name for m in errors), f"{what}:\n{outcome}"
                    assert f"event=reload_failed generation=1 errors={len(positions)} action=kept_old_config" in outcome
                    assert "event=reloaded" not in outcome
                    assert await proxy.metric("wsproxy_reload_failures_total") == failures
                    assert await proxy.metric("wsproxy_reloads_total") == failures
                    # the old config serves: new sessions on the old route, the established one continues
                    assert await which_backend(f"ws://127.0.0.1:{port}/old") == "A", what
                    assert await echo(established, what) == f"A:{what}"
                    status = await proxy.status()
                    assert status["generation"] == 1 and status["reload_failures"] == failures
                    assert status["last_reload_error"], status
                unknown_log = "\n".join(m.group(0) for m in map(RELOAD_FAILED.search, proxy.lines("error=")) if m)
                assert "pol" in unknown_log and "99" in unknown_log and "missing.pem" in unknown_log, unknown_log

                # /new is not routed until a good reload adds it
                with pytest.raises(ConnectionRejected) as rejected:
                    await which_backend(f"ws://127.0.0.1:{port}/new")
                assert rejected.value.status_code == 404
                outcome = await proxy.reload(good_yaml(port, backend.port, admin_port, new_route=True))
                assert "event=reloaded generation=2 " in outcome, outcome
                assert await which_backend(f"ws://127.0.0.1:{port}/new") == "A"
                assert await echo(established, "after") == "A:after"
                assert await proxy.metric("wsproxy_reload_failures_total") == 3
                assert await proxy.metric("wsproxy_reloads_total") == 4
                status = await proxy.status()
                assert status["generation"] == 2 and status["last_reload_error"] is None
            proxy.assert_clean()


# --- 3. a removed backend drains ---------------------------------------------------------------

DRAIN_TIMEOUT_S = 0.5
DRAIN_SPREAD_S = 1.0


@dataclass
class Watched:
    """A session that echoes every 50 ms until it is closed; when and how it ended."""

    ws: WebSocketConnection
    backend: str
    last_echo: float = 0.0
    closed_at: float | None = None
    code: int | None = None
    done: trio.Event = field(default_factory=trio.Event)


async def watch(ws: WebSocketConnection, session: Watched, stop: trio.Event) -> None:
    n = 0
    try:
        while not stop.is_set():
            message = f"m{n}"
            assert await echo(ws, message) == f"{session.backend}:{message}"
            session.last_echo = trio.current_time()
            n += 1
            await trio.sleep(0.05)
    except ConnectionClosed as exc:
        session.closed_at = trio.current_time()
        session.code = exc.reason.code if exc.reason else None
    finally:
        session.done.set()


async def open_watched(nursery: trio.Nursery, url: str, stop: trio.Event) -> Watched:
    """A session on ``url`` watched in ``nursery``; the session lives until ``stop`` or a close."""
    ready = trio.Event()
    result: list[Watched] = []

    async def run() -> None:
        async with open_websocket_url(url) as ws:
            session = Watched(ws, (await echo(ws, "hello")).partition(":")[0])
            result.append(session)
            ready.set()
            await watch(ws, session, stop)

    nursery.start_soon(run)
    await ready.wait()
    return result[0]


async def test_a_removed_backend_drains_with_1012_spread_after_the_grace(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = await start_backend(nursery, "A")
    b = await start_backend(nursery, "B")
    port, admin_port = closed_port(), closed_port()
    drain = {"timeout": f"{DRAIN_TIMEOUT_S}s", "spread": f"{DRAIN_SPREAD_S}s"}
    config = make_config(
        listeners={"public": port}, pools={"main": pool(a.port, b.port, drain=drain)}, routes=[("/", "main")],
        admin_port=admin_port,
    )
    url = f"ws://127.0.0.1:{port}/chat"
    stop = trio.Event()
    with trio.fail_after(40):
        async with run_proxy(tmp_path, config, ports=[port]) as proxy:
            async with trio.open_nursery() as clients:
                sessions = [await open_watched(clients, url, stop) for _ in range(20)]
                on_a = [s for s in sessions if s.backend == "A"]
                on_b = [s for s in sessions if s.backend == "B"]
                assert len(on_a) == len(on_b) == 10  # round robin over two equal backends

                sighup_at = trio.current_time()
                outcome = await proxy.reload(
                    make_config(
                        listeners={"public": port}, pools={"main": pool(a.port, drain=drain)}, routes=[("/", "main")],
                        admin_port=admin_port,
                    )
                )
                applied_by = trio.current_time()
                assert "event=reloaded generation=2 " in outcome, outcome
                # new sessions all go to A at once, while B's sessions are still in their grace period
                assert [await which_backend(url) for _ in range(10)] == ["A"] * 10
                assert trio.current_time() < sighup_at + DRAIN_TIMEOUT_S, "too slow to check during the grace period"

                with trio.fail_after(DRAIN_TIMEOUT_S + DRAIN_SPREAD_S + 3):
                    for session in on_b:
                        await session.done.wait()
                    while len(b.closes) < len(on_b):
                        await trio.sleep(0.01)
                closes = sorted(s.closed_at for s in on_b if s.closed_at is not None)
                report = [(round(s.last_echo - sighup_at, 3), s.closed_at and round(s.closed_at - sighup_at, 3), s.code) for s in on_b]
                assert [s.code for s in on_b] == [1012] * len(on_b), report
                assert len(closes) == len(on_b)
                assert closes[0] >= sighup_at + DRAIN_TIMEOUT_S, report  # not before the grace period
                assert closes[-1] <= applied_by + DRAIN_TIMEOUT_S + DRAIN_SPREAD_S + SLACK_S, report
                assert closes[-1] - closes[0] >= DRAIN_SPREAD_S / 2, report  # spread, not all at once
                # they kept working during the grace period
                assert all(s.last_echo >= sighup_at + DRAIN_TIMEOUT_S - 0.15 for s in on_b), report
                assert b.closes == [1001] * len(on_b), b.closes
                # A's sessions are untouched
                await trio.sleep(0.2)
                assert all(not s.done.is_set() for s in on_a)
                assert a.closes == [1000] * 10  # only the ten short sessions opened after the reload
                stop.set()
            assert all(s.code is None for s in on_a)
            assert a.closes == [1000] * 20  # and now the clients' own closes
            status = await proxy.status()
            assert [x["address"] for x in status["pools"]["main"]["backends"]] == [addr(a.port)]
            assert len(proxy.lines("event=drain_closing")) == 1
            proxy.assert_clean()


# --- 4. listeners ---------------------------------------------------------------------------------


async def test_listeners_are_added_removed_and_moved_by_reload(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, "A")
    p1, p2, p3, admin_port = closed_port(), closed_port(), closed_port(), closed_port()
    pools = {"main": pool(backend.port)}

    def config(**listeners: int) -> dict[str, Any]:
        return make_config(listeners=listeners, pools=pools, routes=[("/", "main")], admin_port=admin_port)

    with trio.fail_after(40):
        async with run_proxy(tmp_path, config(public=p1), ports=[p1]) as proxy:
            async with open_websocket_url(f"ws://127.0.0.1:{p1}/") as via_p1:
                assert not await accepts(p2)

                outcome = await proxy.reload(config(public=p1, second=p2))
                assert "event=reloaded generation=2 " in outcome and f"listener=second address=127.0.0.1:{p2}" in outcome
                assert await which_backend(f"ws://127.0.0.1:{p2}/") == "A"
                async with open_websocket_url(f"ws://127.0.0.1:{p2}/") as via_p2:
                    assert await echo(via_p2, "through the second listener") == "A:through the second listener"

                    outcome = await proxy.reload(config(public=p1))
                    assert "event=reloaded generation=3 " in outcome and "event=listener_closed listener=second" in outcome
                    assert not await accepts(p2), "the removed listener still accepts"
                    for n in range(5):  # its established session goes on
                        assert await echo(via_p2, f"still here {n}") == f"A:still here {n}"
                        await trio.sleep(0.05)
                    assert await which_backend(f"ws://127.0.0.1:{p1}/") == "A"

                    outcome = await proxy.reload(config(public=p3))
                    assert "event=reloaded generation=4 " in outcome and "event=listener_closed listener=public" in outcome
                    assert not await accepts(p1), "the old port still accepts"
                    assert await which_backend(f"ws://127.0.0.1:{p3}/") == "A"
                    assert await echo(via_p1, "old port, established") == "A:old port, established"
                    assert await echo(via_p2, "second, established") == "A:second, established"
            status = await proxy.status()
            assert [(x["name"], x["addresses"]) for x in status["listeners"]] == [("public", [addr(p3)])]
            proxy.assert_clean()


# --- 5. certificate rotation ------------------------------------------------------------------


def write_leaf(leaf: trustme.LeafCert, cert: Path, key: Path, *, key_of: trustme.LeafCert | None = None) -> bytes:
    """Write ``leaf``'s chain and key (or ``key_of``'s key) atomically; return the leaf's DER."""
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    for path, blob in ((cert, chain), (key, (key_of or leaf).private_key_pem.bytes())):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


async def served_cert(port: int, ctx: ssl.SSLContext) -> bytes:
    """The DER of the certificate a new TLS handshake with ``port`` gets."""
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="localhost")
    try:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
        assert der is not None
        return der
    finally:
        await trio.aclose_forcefully(stream)


async def test_certificates_rotate_for_new_handshakes_only(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, "A")
    port, admin_port = closed_port(), closed_port()
    first_ca, second_ca = trustme.CA(), trustme.CA()
    ctx = ssl.create_default_context()
    first_ca.configure_trust(ctx)
    second_ca.configure_trust(ctx)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    first = write_leaf(first_ca.issue_cert("localhost", "127.0.0.1"), cert, key)

    def config(cert: Path, key: Path) -> dict[str, Any]:
        return make_config(
            listeners={"public": {"bind": addr(port), "tls": {"cert": str(cert), "key": str(key)}}},
            pools={"main": pool(backend.port)}, routes=[("/", "main")], admin_port=admin_port,
        )

    url = f"wss://localhost:{port}/"
    with trio.fail_after(40):
        async with run_proxy(tmp_path, config(cert, key), ports=[port]) as proxy:
            assert await served_cert(port, ctx) == first
            async with open_websocket_url(url, ssl_context=ctx) as established:
                assert await echo(established, "first cert") == "A:first cert"

                # renewed in place (another CA), same YAML: the files are re-read
                second = write_leaf(second_ca.issue_cert("localhost", "127.0.0.1"), cert, key)
                assert "event=reloaded generation=2 " in await proxy.reload()
                assert await served_cert(port, ctx) == second
                assert await echo(established, "after the first rotation") == "A:after the first rotation"
                async with open_websocket_url(url, ssl_context=ctx) as fresh:
                    assert await echo(fresh, "new handshake") == "A:new handshake"

                # new file names in the YAML, same CA, another serial
                cert3, key3 = tmp_path / "cert3.pem", tmp_path / "key3.pem"
                third = write_leaf(first_ca.issue_cert("localhost", "127.0.0.1"), cert3, key3)
                assert third != first
                assert "event=reloaded generation=3 " in await proxy.reload(config(cert3, key3))
                assert await served_cert(port, ctx) == third

                # a key that does not match its certificate is refused whole; the third stays
                write_leaf(first_ca.issue_cert("localhost"), cert3, key3, key_of=second_ca.issue_cert("localhost"))
                outcome = await proxy.reload()
                assert "action=kept_old_config" in outcome and RELOAD_FAILED.search(outcome), outcome
                assert await served_cert(port, ctx) == third
                assert await echo(established, "still the first session") == "A:still the first session"
            proxy.assert_clean()


# --- 6. backend state survives --------------------------------------------------------------


async def test_backend_state_survives_an_unrelated_reload(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = await start_backend(nursery, "A")
    b = await start_backend(nursery, "B")
    c = await start_backend(nursery, "C")
    dead = closed_port()
    port, admin_port = closed_port(), closed_port()
    health = {"type": "websocket", "interval": "200ms", "timeout": "1s", "fall": 2, "rise": 2}
    passive = {"failures": 1, "window": "10s", "ejection": "30s", "max_ejected_percent": 50}

    def config(handshake: str) -> dict[str, Any]:
        return make_config(
            listeners={"public": port},
            pools={"main": pool(a.port, b.port, health=health), "side": pool(dead, c.port, passive=passive)},
            routes=[("/side", "side"), ("/", "main")],
            admin_port=admin_port,
            timeouts={"handshake": handshake},
        )

    main_url, side_url = f"ws://127.0.0.1:{port}/", f"ws://127.0.0.1:{port}/side"
    with trio.fail_after(40):
        async with run_proxy(tmp_path, config("10s"), ports=[port]) as proxy:
            with trio.fail_after(5):
                while {backend_status(await proxy.status(), "main", p)["health"] for p in (a.port, b.port)} != {"up"}:
                    await trio.sleep(0.05)
            assert sorted([await which_backend(main_url) for _ in range(4)]) == ["A", "A", "B", "B"]
            # the dead backend of "side" fails a connect and is ejected (the session is retried on C)
            assert [await which_backend(side_url) for _ in range(2)] == ["C", "C"]

            b.stop()
            with trio.fail_after(5):
                while backend_status(await proxy.status(), "main", b.port)["health"] != "down":
                    await trio.sleep(0.05)
            before = await proxy.status()
            assert backend_status(before, "side", dead)["ejected"] is True

            outcome = await proxy.reload(config("9s"))
            assert "event=reloaded generation=2 " in outcome, outcome
            after = await proxy.status()
            assert after["generation"] == 2
            b_after, b_before = backend_status(after, "main", b.port), backend_status(before, "main", b.port)
            assert b_after["health"] == "down", b_after  # not "unknown": the state was kept
            assert b_after["available"] is False and b_after["total"] == b_before["total"] == 2
            assert backend_status(after, "side", dead)["ejected"] is True
            assert backend_status(after, "main", a.port)["total"] == backend_status(before, "main", a.port)["total"] == 2
            assert backend_status(after, "side", c.port)["total"] == 2

            # the counts go on from where they were, and the down backend gets nothing
            assert [await which_backend(main_url) for _ in range(3)] == ["A"] * 3
            later = await proxy.status()
            assert backend_status(later, "main", a.port)["total"] == 5
            assert backend_status(later, "main", b.port)["health"] == "down"
            # B became known once, at start; the reload did not make it unknown again
            assert len([line for line in proxy.lines(f"backend={addr(b.port)}") if "was=unknown" in line]) == 1
            proxy.assert_clean()


# --- 7. the edges of draining and listeners -------------------------------------------------------


async def test_a_backend_removed_again_gets_its_full_grace_period(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Removed, put back, removed again: the grace period counts from the last removal.

    The first removal's timer must not close the sessions of the second one.
    """
    a = await start_backend(nursery, "A")
    b = await start_backend(nursery, "B")
    port, admin_port = closed_port(), closed_port()
    grace_s = 1.5
    drain = {"timeout": f"{grace_s}s", "spread": "0s"}

    def config(*ports: int) -> dict[str, Any]:
        return make_config(
            listeners={"public": port}, pools={"main": pool(*ports, drain=drain)}, routes=[("/", "main")],
            admin_port=admin_port,
        )

    url = f"ws://127.0.0.1:{port}/"
    stop = trio.Event()
    with trio.fail_after(30):
        async with run_proxy(tmp_path, config(a.port, b.port), ports=[port]) as proxy:
            async with trio.open_nursery() as clients:
                sessions = [await open_watched(clients, url, stop) for _ in range(4)]
                on_b = [s for s in sessions if s.backend == "B"]
                assert len(on_b) == 2

                first_removal = trio.current_time()
                assert "event=reloaded generation=2 " in await proxy.reload(config(a.port))
                await trio.sleep(0.3)
                assert "event=reloaded generation=3 " in await proxy.reload(config(a.port, b.port))  # back: undrained
                await trio.sleep(0.7)
                second_removal = trio.current_time()
                assert "event=reloaded generation=4 " in await proxy.reload(config(a.port))

                with trio.fail_after(grace_s + 3):
                    for session in on_b:
                        await session.done.wait()
                stop.set()
            closes = [round(s.closed_at - second_removal, 3) for s in on_b if s.closed_at is not None]
            assert [s.code for s in on_b] == [1012, 1012]
            assert min(closes) >= grace_s, (
                f"B's sessions were closed {closes} s after the second removal, before its {grace_s}s grace period "
                f"({round(second_removal - first_removal, 3)}s after the first removal):\n"
                + "\n".join(proxy.lines("event=drain"))
            )


async def test_sessions_of_a_pool_that_lost_a_backend_drain_even_if_another_pool_keeps_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Pool "other" loses B, pool "main" keeps it: other's sessions on B drain, main's do not."""
    a = await start_backend(nursery, "A")
    b = await start_backend(nursery, "B")
    port, admin_port = closed_port(), closed_port()
    drain = {"timeout": "300ms", "spread": "0s"}

    def config(other: int) -> dict[str, Any]:
        return make_config(
            listeners={"public": port},
            pools={"main": pool(b.port, drain=drain), "other": pool(other, drain=drain)},
            routes=[("/other", "other"), ("/", "main")],
            admin_port=admin_port,
        )

    stop = trio.Event()
    with trio.fail_after(30):
        async with run_proxy(tmp_path, config(b.port), ports=[port]) as proxy:
            async with trio.open_nursery() as clients:
                via_main = await open_watched(clients, f"ws://127.0.0.1:{port}/", stop)
                via_other = await open_watched(clients, f"ws://127.0.0.1:{port}/other", stop)
                assert via_main.backend == via_other.backend == "B"

                assert "event=reloaded generation=2 " in await proxy.reload(config(a.port))
                assert await which_backend(f"ws://127.0.0.1:{port}/other") == "A"
                with trio.move_on_after(0.3 + 1.5):
                    await via_other.done.wait()
                main_open = not via_main.done.is_set()
                stop.set()
            assert main_open, "main's session on B was closed, but B is still in main"
            assert via_other.code == 1012, (
                "the session of pool other on B was not drained after B left pool other "
                f"(closed with {via_other.code} at the end of the test):\n" + "\n".join(proxy.lines("event=drain"))
            )


@pytest.mark.parametrize(
    ("name", "host"), [("web", "127.0.0.1"), ("public", "0.0.0.0")], ids=["renamed", "host-widened"]
)


async def test_a_listener_whose_port_stays_is_reloaded(nursery: trio.Nursery, tmp_path: Path, name: str, host: str) -> None:
    """Renamed with the same bind, or the same port on a wider host: the reload applies and the port accepts.

    Either way the new socket needs the port the old one still holds.
    """
    backend = await start_backend(nursery, "A")
    port, admin_port = closed_port(), closed_port()

    def config(name: str, host: str) -> dict[str, Any]:
        return make_config(
            listeners={name: {"bind": f"{host}:{port}"}}, pools={"main": pool(backend.port)}, routes=[("/", "main")],
            admin_port=admin_port,
        )

    with trio.fail_after(20):
        async with run_proxy(tmp_path, config("public", "127.0.0.1"), ports=[port]) as proxy:
            async with open_websocket_url(f"ws://127.0.0.1:{port}/") as established:
                outcome = await proxy.reload(config(name, host))
                assert "event=reloaded generation=2 " in outcome, outcome
                assert await which_backend(f"ws://127.0.0.1:{port}/") == "A"
                assert await echo(established, "still here") == "A:still here"
            status = await proxy.status()
            assert [(x["name"], x["addresses"]) for x in status["listeners"]] == [(name, [f"{host}:{port}"])]
