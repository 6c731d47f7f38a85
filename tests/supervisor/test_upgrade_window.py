"""During an upgrade's window the admin API, now the new supervisor's, still sees and steers the retiring generation.

Real processes: ``python -m wsproxy run`` with ``workers: 2`` and an
``upgrade.timeout`` of an hour (``tests.kit.sessions.cli_config``: static
token identities, an admin token), a trio-websocket echo backend and
trio-websocket clients in this process, ``wsproxy upgrade`` / ``sessions`` /
``kick`` as subprocesses. Sessions are opened, the proxy is upgraded, more
sessions are opened on the new generation; then, through the new
supervisor: ``/status`` says which generation retires and how many sessions
it holds; ``GET /sessions`` lists both generations' sessions, each once, on
any page size; an old session is kicked by id (its client sees the code);
an identity close reaches old and new sessions (their closes summed); an old
worker or the old supervisor stopped with SIGSTOP is named in
``unanswered`` (``retiring/SLOT``, ``retiring``), beside a stopped new
worker's slot, and ``wsproxy sessions`` names them all on stderr. Once the old sessions end,
the old generation exits and the API answers with the new sessions only, at
once (no wait for a generation that is gone).

``/metrics`` (OpenMetrics, read by its strict parser) carries the old
generation's series labelled ``generation="retiring"``: its sessions per
worker, the closes of an old worker that exited, until it has exited as a
whole (the merge itself: ``test_retiring_metrics.py``). After two upgrades in
a row, the newest supervisor's retiring series count both older generations,
and the oldest one's closes stay counted once it has exited.

In a browser (Debian's Chromium, skipped without it), the status page's header
says which generation retires and with how many sessions, until it exits.

The decisions (routing, merging, naming) are tested purely in
``test_fanout.py``; the upgrade itself (no session lost, no connect refused)
in ``test_workers.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from tests.kit.admin import call
from tests.kit.browser import Browser, expect, needs_browser, with_browser
from tests.kit.process import CLI_TOKEN as TOKEN, Running, out, running
from tests.kit.servers import closed_port, start_ws_backend
from tests.kit.sessions import cli_config, hold
from tests.kit.wait import until

#: The new supervisor's deadline for an answer (``fanout.FANOUT_TIMEOUT_S``), with room for a loaded machine.
FANOUT_WAIT_S = 3.0 + 5.0
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


async def get(admin: str, target: str, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    reply = await call(admin, "GET", target, token=token.encode() if token else None)
    return reply.status, json.loads(reply.body)


async def listed(admin: str, **query: str) -> tuple[list[str], set[object]]:
    """Every session id, following ``next`` page by page; and who did not answer on any page."""
    ids: list[str] = []
    unanswered: set[object] = set()
    cursor = None
    while True:
        code, body = await get(admin, "/sessions?" + urlencode({**query, **({"cursor": cursor} if cursor else {})}))
        assert code == 200, body
        ids += [s["id"] for s in body["sessions"]]
        unanswered.update(body["unanswered"])
        cursor = body["next"]
        if cursor is None:
            return ids, unanswered


async def fewest_per_worker(admin: str, slots: dict[int, int]) -> int:
    """The fewest sessions one of ``slots``' workers holds (by their ids' ``w{SLOT}x`` prefix)."""
    ids, _ = await listed(admin)
    return min(sum(i.startswith(f"w{slot}x") for i in ids) for slot in slots)


async def status_of(admin: str, supervisor: int, token: str | None = TOKEN) -> dict[str, Any]:
    """``/status`` once ``supervisor`` answers it and both its workers serve and have reported."""
    while True:
        try:
            code, status = await get(admin, "/status", token)
        except OSError:  # the admin listener moves from one supervisor to the other
            code, status = 0, {}
        workers = status.get("workers") or []
        if code == 200 and status["pid"] == supervisor and workers and all(
            w["state"] == "ready" and w["rss_bytes"] for w in workers
        ):
            return status
        await trio.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _stop_new_generation(proxy: Running) -> None:
    """SIGTERM to every supervisor the upgrade started (not our children), then SIGKILL what is left."""
    with trio.CancelScope(shield=True):
        pids = [int(p) for p in re.findall(r"event=upgrade_started new_pid=(\d+)", proxy.log())]
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)
        with trio.move_on_after(10):
            while any(_alive(p) for p in pids):
                await trio.sleep(0.05)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(150)
async def test_the_new_supervisor_lists_kicks_and_closes_the_retiring_generations_sessions(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    await _with_two_workers(tmp_path, nursery, _across_the_window, limit_s=120)


async def _with_two_workers(
    tmp_path: Path,
    nursery: trio.Nursery,
    body: Callable[[Running, str, int, trio.Nursery], Awaitable[None]],
    *,
    limit_s: float,
) -> None:
    """Run ``body(proxy, admin, port, nursery)`` against a real two-worker proxy; stop whichever generation is left."""
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    backend = await start_ws_backend(nursery)
    port, admin_port = closed_port(), closed_port()
    admin = f"127.0.0.1:{admin_port}"
    config = cli_config(port, backend, admin_port) + "workers: 2\nupgrade: {timeout: 1h}\n"
    async with running(tmp_path, config, admin) as proxy:
        try:
            with trio.fail_after(limit_s):
                await body(proxy, admin, port, nursery)
        finally:
            await _stop_new_generation(proxy)


async def _across_the_window(proxy: Running, admin: str, port: int, nursery: trio.Nursery) -> None:
    old = await status_of(admin, proxy.pid)
    assert old["retiring"] is None  # no upgrade yet
    old_workers = {int(w["slot"]): int(w["pid"]) for w in old["workers"]}
    # alice's sessions until each old worker holds two (the kernel spreads connections by their ports): a retiring
    # worker without sessions exits at once, and each must outlive the kick and the identity close below
    old_alices = [await hold(port, "alice", nursery) for _ in range(4)]
    while await fewest_per_worker(admin, old_workers) < 2:
        assert len(old_alices) < 40
        old_alices.append(await hold(port, "alice", nursery))
    _, old_bob_ended, old_bob = await hold(port, "bob", nursery)
    old_ids, _ = await listed(admin)
    assert len(old_ids) == len(old_alices) + 1

    done = await proxy.cmd("upgrade")
    assert done.returncode == 0, out(done) + proxy.log()
    new_pid = int(re.findall(r"pid (\d+)", done.stdout.decode())[0])
    new = await status_of(admin, new_pid)
    assert {int(w["pid"]) for w in new["workers"]}.isdisjoint(old_workers.values())

    async def retiring() -> dict[str, Any] | None:
        _, status = await get(admin, "/status")
        return status["retiring"]

    await until(
        lambda: _holds(retiring, {"pid": proxy.pid, "sessions": len(old_ids), "workers": 2}),
        timeout_s=10,
        what="the retiring summary",
    )
    assert (await retiring() or {})["deadline_unix"] > old["started_unix"] + 3000  # upgrade.timeout: 1h
    done = await proxy.cmd("status")
    assert done.returncode == 0, out(done)
    assert f"retiring generation: pid {proxy.pid}, 2 worker(s), {len(old_ids)} session(s), closed by " in done.stdout.decode()

    _, new_alice_ended, _ = await hold(port, "alice", nursery)
    _, new_bob_ended, new_bob = await hold(port, "bob", nursery)

    # both generations listed, each session once, in one order whatever the page size
    ids, unanswered = await listed(admin)
    assert unanswered == set() and len(ids) == len(old_ids) + 2 == len(set(ids)) and set(old_ids) < set(ids), (ids, old_ids)
    for limit in ("1", "3", "1000"):
        assert (await listed(admin, limit=limit))[0] == ids
    done = await proxy.cmd("sessions", "--json")
    assert done.returncode == 0 and done.stderr == b"", out(done)
    assert [s["id"] for s in json.loads(done.stdout)["sessions"]] == ids
    done = await proxy.cmd("sessions", "--identity", "bob", "--json")
    assert len(json.loads(done.stdout)["sessions"]) == 2  # the old bob and the new one

    # an old session kicked by id: routed to the old generation, its client sees the code
    alices = {r["id"] for r in (await get(admin, "/sessions?identity=alice"))[1]["sessions"]}
    kicked_id = next(i for i in old_ids if i in alices and i.startswith("w0x"))
    done = await proxy.cmd("kick", "--session", kicked_id, "--code", "4000", "--reason", "bye old")
    assert (done.returncode, done.stdout.decode()) == (0, f"wsproxy: session {kicked_id}: closing\n"), out(done)
    with trio.fail_after(5):
        while not any(ended.is_set() for _, ended, _ in old_alices):
            await trio.sleep(0.02)
    assert [outcome for _, ended, outcome in old_alices if ended.is_set()] == [[4000, "bye old"]]
    done = await proxy.cmd("kick", "--session", kicked_id)
    assert done.returncode == 1 and "no session" in done.stderr.decode(), out(done)

    # an identity close reaches both generations, the closes summed
    done = await proxy.cmd("kick", "--identity", "bob")
    assert done.stdout.decode() == "wsproxy: identity bob: closing 2 session(s)\n", out(done)
    for ended in (old_bob_ended, new_bob_ended):
        await ended.wait()
    assert old_bob == new_bob == [1008, "closed by the operator"]
    assert len(proxy.lines("event=session_closed_by_admin")) == 3  # logged by the workers that closed them

    new_workers = {int(w["slot"]): int(w["pid"]) for w in new["workers"]}
    await _unanswered(proxy, admin, proxy.pid, old_workers, new_workers)

    # the old generation let go: its sessions end, it exits; the API answers with the new sessions only, at once
    for ws, _, _ in old_alices:
        await ws.aclose()
    assert await proxy.wait_exit(20) == 0
    await until(lambda: _holds(retiring, None), timeout_s=5, what="retiring: null")
    started = trio.current_time()
    ids, unanswered = await listed(admin)
    assert unanswered == set() and len(ids) == 1 and ids[0] not in old_ids, ids
    reply = await call(admin, "POST", f"/sessions/{old_ids[-1]}/close", token=TOKEN.encode())
    assert reply.status == 404, reply
    assert trio.current_time() - started < 2.0  # far below the 3 s a generation that does not answer costs
    done = await proxy.cmd("kick", "--identity", "alice")
    assert done.stdout.decode() == "wsproxy: identity alice: closing 1 session(s)\n", out(done)
    await new_alice_ended.wait()


async def _holds(summary: Any, expected: dict[str, Any] | None) -> bool:
    got = await summary()
    if expected is None or got is None:
        return bool(got == expected)
    return all(got.get(k) == v for k, v in expected.items())


async def _unanswered(
    proxy: Running, admin: str, old_supervisor: int, old_workers: dict[int, int], new_workers: dict[int, int]
) -> None:
    """Old worker 1 and new worker 1 stopped: ``[1, "retiring/1"]``; the old supervisor stopped: ``retiring``."""
    stopped = [old_workers[1], new_workers[1]]
    try:
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        with trio.fail_after(FANOUT_WAIT_S):
            code, body = await get(admin, "/sessions")
        assert (code, body["unanswered"]) == (200, [1, "retiring/1"]), body
        done = await proxy.cmd("sessions")
        assert done.returncode == 0, out(done)
        assert "worker(s) 1, retiring/1 did not answer in time" in done.stderr.decode(), out(done)
        os.kill(new_workers[1], signal.SIGCONT)
        stopped.append(old_supervisor)
        os.kill(old_supervisor, signal.SIGSTOP)
        with trio.fail_after(FANOUT_WAIT_S):
            code, body = await get(admin, "/sessions")
        assert (code, body["unanswered"]) == (200, ["retiring"]), body
        assert len(body["sessions"]) == 1  # the new alice: the new workers answered
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):  # not to hide why the test failed
                os.kill(pid, signal.SIGCONT)


@needs_browser
@pytest.mark.timeout(150)
async def test_the_status_page_says_which_generation_retires(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_ws_backend(nursery)
    port, admin_port = closed_port(), closed_port()
    admin = f"127.0.0.1:{admin_port}"
    config = cli_config(port, backend, admin_port).replace(", token_file: admin.token", "")  # the page without a token
    async with running(tmp_path, config + "workers: 2\nupgrade: {timeout: 1h}\n", admin) as proxy:
        try:
            with trio.fail_after(120):
                await status_of(admin, proxy.pid, token=None)
                held, _, _ = await hold(port, "alice", nursery)
                done = await proxy.cmd("upgrade")
                assert done.returncode == 0, out(done) + proxy.log()
                await status_of(admin, int(re.findall(r"pid (\d+)", done.stdout.decode())[0]), token=None)

                def steps(browser: Browser) -> None:
                    fact = browser.page.locator("#retiring-fact")
                    expect(fact).to_be_visible()
                    expect(browser.page.locator("#retiring")).to_have_text(
                        re.compile(rf"^pid {proxy.pid}: 1 session until \d\d:\d\d:\d\d at most$")
                    )
                    browser.screenshot("status-page-retiring.png")
                    trio.from_thread.run(held.aclose)  # the old generation's last session: it exits
                    expect(fact).to_be_hidden(timeout=15000)

                errors = await trio.to_thread.run_sync(partial(with_browser, f"http://{admin}/", steps))
                assert errors == [], errors
                assert await proxy.wait_exit(10) == 0
        finally:
            await _stop_new_generation(proxy)


async def _metrics(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of ``/metrics`` in OpenMetrics, read by its strict parser (a valid exposition, or this fails)."""
    reply = await call(admin, "GET", "/metrics", token=TOKEN.encode(), headers=[("Accept", OPENMETRICS)])
    assert reply.status == 200, reply
    families = openmetrics_families(reply.body.decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def _retiring(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, float]:
    """``name``'s samples labelled ``generation="retiring"``, by their ``worker`` label (``-`` without one)."""
    return {
        dict(labels).get("worker", "-"): value
        for (sample, labels), value in samples.items()
        if sample == name and ("generation", "retiring") in labels
    }


async def _metrics_across_the_window(proxy: Running, admin: str, port: int, nursery: trio.Nursery) -> None:
    old_workers = {int(w["slot"]): int(w["pid"]) for w in (await status_of(admin, proxy.pid))["workers"]}
    held = [(await hold(port, "alice", nursery))[0] for _ in range(2)]
    while await fewest_per_worker(admin, old_workers) < 1:  # a session on each old worker (the kernel spreads them)
        assert len(held) < 40
        held.append((await hold(port, "alice", nursery))[0])
    old_ids, _ = await listed(admin)
    done = await proxy.cmd("upgrade")
    assert done.returncode == 0, out(done) + proxy.log()
    await status_of(admin, int(re.findall(r"pid (\d+)", done.stdout.decode())[0]))

    async def retiring(name: str) -> dict[str, float]:
        return _retiring(await _metrics(admin), name)

    async def sessions_held() -> bool:
        by_worker = await retiring("wsproxy_sessions_active")
        return set(by_worker) == {"0", "1"} and sum(by_worker.values()) == len(held)

    await until(sessions_held, timeout_s=10, what="the retiring sessions in /metrics, by worker")
    samples = await _metrics(admin)
    # the new generation's series stay its own (no session there); the proxy-wide and the supervisor's are not repeated
    new_sessions = [v for (n, labels), v in samples.items() if n == "wsproxy_sessions_active" and len(labels) == 2]
    assert new_sessions and sum(new_sessions) == 0, samples
    assert _retiring(samples, "wsproxy_sessions_closed_total") == {}  # none closed yet
    for name in ("wsproxy_config_generation", "wsproxy_reloads_total", "wsproxy_workers"):
        assert (name, ()) in samples and _retiring(samples, name) == {}, name

    # old worker 0's sessions closed: it exits; its own series go, its closes stay counted (its last report)
    kicked = [i for i in old_ids if i.startswith("w0x")]
    for session_id in kicked:
        reply = await call(admin, "POST", f"/sessions/{session_id}/close", token=TOKEN.encode())
        assert reply.status == 200, reply
    await until(
        lambda: _only_worker(retiring, "process_resident_memory_bytes", "1"), timeout_s=10, what="old worker 0 gone"
    )
    assert sum((await retiring("wsproxy_sessions_closed_total")).values()) == len(kicked)
    assert await retiring("wsproxy_sessions_active") == {"1": len(held) - len(kicked)}

    for ws in held:  # the old generation's last sessions: it exits, and its series with it
        await ws.aclose()
    assert await proxy.wait_exit(20) == 0
    await until(lambda: _no_retiring_series(admin), timeout_s=5, what='no generation="retiring" series')


async def _only_worker(retiring: Any, name: str, worker: str) -> bool:
    return set(await retiring(name)) == {worker}


async def _no_retiring_series(admin: str) -> bool:
    return not any(("generation", "retiring") in labels for _, labels in await _metrics(admin))


async def _metrics_across_two_upgrades(proxy: Running, admin: str, port: int, nursery: trio.Nursery) -> None:
    """A (``proxy``) retires behind B, B behind C; C's ``generation="retiring"`` series count A's and B's sessions."""
    await status_of(admin, proxy.pid)
    in_a = [(await hold(port, "alice", nursery))[0] for _ in range(2)]
    supervisors = []
    for _ in range(2):
        done = await proxy.cmd("upgrade")
        assert done.returncode == 0, out(done) + proxy.log()
        supervisors.append(int(re.findall(r"pid (\d+)", done.stdout.decode())[0]))
        await status_of(admin, supervisors[-1])
        if len(supervisors) == 1:
            in_b = [(await hold(port, "alice", nursery))[0] for _ in range(3)]
    b = supervisors[0]

    async def retiring(name: str) -> dict[str, float]:
        return _retiring(await _metrics(admin), name)

    async def both_counted() -> bool:
        by_worker = await retiring("wsproxy_sessions_active")
        older = sum(v for w, v in by_worker.items() if w.startswith("older:"))
        return older == len(in_a) and sum(by_worker.values()) == len(in_a) + len(in_b)

    await until(both_counted, timeout_s=10, what="A's and B's sessions in C's /metrics, A's workers as older:SLOT")
    code, status = await get(admin, "/status")
    assert code == 200 and status["retiring"]["pid"] == b and status["retiring"]["sessions"] == len(in_a) + len(in_b)
    assert _retiring(await _metrics(admin), "wsproxy_sessions_closed_total") == {}

    for ws in in_a:  # A's sessions end: A exits; its closes stay in the retiring sums (B keeps its last text)
        await ws.aclose()
    assert await proxy.wait_exit(20) == 0

    async def a_gone_its_closes_kept() -> bool:
        samples = await _metrics(admin)
        by_worker = _retiring(samples, "wsproxy_sessions_active")
        closed = sum(_retiring(samples, "wsproxy_sessions_closed_total").values())
        return set(by_worker) <= {"0", "1"} and sum(by_worker.values()) == len(in_b) and closed == len(in_a)

    await until(a_gone_its_closes_kept, timeout_s=10, what="A's gauges gone from C's /metrics, its closes kept")

    for ws in in_b:  # B's last sessions: B exits, and every retiring series with it
        await ws.aclose()
    with trio.fail_after(20):
        while _alive(b):
            await trio.sleep(0.05)
    await until(lambda: _no_retiring_series(admin), timeout_s=5, what='no generation="retiring" series')


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(_metrics_across_the_window, id="the-retiring-generations-series-until-it-exits"),
        pytest.param(_metrics_across_two_upgrades, id="two-upgrades-in-a-row-both-retiring-generations"),
    ],
)
async def test_the_new_supervisors_metrics(
    nursery: trio.Nursery, tmp_path: Path, body: Callable[[Running, str, int, trio.Nursery], Awaitable[None]]
) -> None:
    await _with_two_workers(tmp_path, nursery, body, limit_s=70)
