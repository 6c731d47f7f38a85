"""The whole proxy of ``workers: 2`` seen and steered through its supervisor, end to end: real processes, clients, commands.

The proxy is ``python -m wsproxy run`` with ``workers: 2``, an admin token and
a route with static tokens (``tests.kit.sessions.cli_config``);
clients are trio-websocket connections held open in the test's nursery; the
commands are subprocesses. Covered: sessions opened to both workers are all
listed by ``wsproxy sessions`` (ids prefixed by their worker, ``w0x``/``w1x``)
and by ``GET /sessions`` page by page; one is kicked by id through the
supervisor (its client gets the code and reason), an identity close reaches
both workers and sums their closes; a worker that does not answer (stopped
with SIGSTOP) is named in ``unanswered``, and with none answering the answer
is 504. The merge rules are tested purely in ``test_fanout.py``.

In the same run: every line a worker logs says ``worker=SLOT``, and
``/metrics`` answers OpenMetrics when ``Accept`` asks for it (the merge is
tested purely in ``test_table.py``). In a browser (Debian's Chromium, as
``tests/e2e/test_status_page.py`` drives it; skipped without it), the status
page shows a row per worker, and a worker's restart.
"""

from __future__ import annotations

import json
import os
import re
import signal
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from tests.kit.admin import call
from tests.kit.browser import Browser, expect, needs_browser, no_horizontal_scroll, with_browser
from tests.kit.process import CLI_TOKEN as TOKEN, Running, out, running
from tests.kit.servers import closed_port, start_ws_backend
from tests.kit.sessions import cli_config, hold
from wsproxy.log import parse_pairs

#: How long the supervisor waits for its workers' answers (``supervisor.fanout.FANOUT_TIMEOUT_S``), with room.
FANOUT_WAIT_S = 3.0 + 5.0


async def get(admin: str, target: str, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    reply = await call(admin, "GET", target, token=token.encode() if token else None)
    return reply.status, json.loads(reply.body)


async def workers_ready(admin: str, token: str | None = TOKEN) -> dict[int, int]:
    """Poll ``/status`` until both workers serve and have reported; their pids by slot."""
    while True:
        try:
            code, status = await get(admin, "/status", token)
        except OSError:
            code, status = 0, {}
        workers = status.get("workers") or []
        if code == 200 and workers and all(w["state"] == "ready" and w["rss_bytes"] for w in workers):
            return {int(w["slot"]): int(w["pid"]) for w in workers}
        await trio.sleep(0.1)


async def listed(admin: str, **query: str) -> list[str]:
    """Every session id, following ``next`` page by page (``limit`` as given)."""
    ids: list[str] = []
    cursor = None
    while True:
        code, body = await get(admin, "/sessions?" + urlencode({**query, **({"cursor": cursor} if cursor else {})}))
        assert code == 200 and body["unanswered"] == [], body
        ids += [s["id"] for s in body["sessions"]]
        cursor = body["next"]
        if cursor is None:
            return ids


async def test_sessions_listed_kicked_and_closed_across_two_workers(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    backend = await start_ws_backend(nursery)
    port, admin_port = closed_port(), closed_port()
    admin = f"127.0.0.1:{admin_port}"
    async with running(tmp_path, cli_config(port, backend, admin_port) + "workers: 2\n", admin) as proxy:
        with trio.fail_after(90):
            pids = await workers_ready(admin)
            assert sorted(pids) == [0, 1]
            # alice's sessions until both workers hold some (the kernel spreads connections by their ports)
            alices = [await hold(port, "alice", nursery) for _ in range(4)]
            while len({i[:3] for i in await listed(admin)}) < 2:
                assert len(alices) < 40, await listed(admin)
                alices.append(await hold(port, "alice", nursery))
            _, bob_ended, bob = await hold(port, "bob", nursery)

            await _metrics_in_both_formats(admin)
            ids = await listed(admin)
            assert len(ids) == len(alices) + 1 and len(set(ids)) == len(ids)
            assert {i[:3] for i in ids} == {"w0x", "w1x"}
            for limit in ("1", "2", "1000"):
                assert await listed(admin, limit=limit) == ids  # one order, every page, no repeat
            done = await proxy.cmd("sessions", "--json")
            assert done.returncode == 0 and done.stderr == b"", out(done)
            assert [s["id"] for s in json.loads(done.stdout)["sessions"]] == ids
            done = await proxy.cmd("sessions", "--identity", "bob", "--json")
            (bob_record,) = json.loads(done.stdout)["sessions"]
            bob_id = bob_record["id"]

            done = await proxy.cmd("kick", "--session", bob_id, "--code", "4000", "--reason", "bye bob")
            assert (done.returncode, done.stdout.decode()) == (0, f"wsproxy: session {bob_id}: closing\n"), out(done)
            await bob_ended.wait()
            assert bob == [4000, "bye bob"]
            done = await proxy.cmd("kick", "--session", bob_id)
            assert done.returncode == 1 and "no session" in done.stderr.decode(), out(done)
            done = await proxy.cmd("kick", "--session", "w7x00001")  # no such worker
            assert done.returncode == 1 and "no session" in done.stderr.decode(), out(done)

            done = await proxy.cmd("kick", "--identity", "alice")
            assert done.stdout.decode() == f"wsproxy: identity alice: closing {len(alices)} session(s)\n", out(done)
            for _, ended, outcome in alices:
                await ended.wait()
                assert outcome == [1008, "closed by the operator"]
            closes = proxy.lines("event=session_closed_by_admin")
            assert len(closes) == len(alices) + 1
            assert {line.split(" conn=")[1][:3] for line in closes} == {"w0x", "w1x"}  # written by both workers
            _each_line_names_its_worker(proxy.log(), pids)

            await _unanswered(proxy, admin, pids)


async def _metrics_in_both_formats(admin: str) -> None:
    """``/metrics`` merged from both workers: OpenMetrics (valid, ``# EOF``) when asked for, else the text format."""
    asked = [("Accept", "application/openmetrics-text; version=1.0.0; charset=utf-8,text/plain;version=0.0.4;q=0.5")]
    reply = await call(admin, "GET", "/metrics", token=TOKEN.encode(), headers=asked)
    assert reply.status == 200 and reply.headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    text = reply.body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in openmetrics_families(text)}
    assert [s.value for s in families["wsproxy_workers"].samples] == [2]
    assert {s.labels.get("worker") for s in families["process_resident_memory_bytes"].samples} == {"0", "1"}
    assert families["wsproxy_sessions_closed"].type == "counter"
    plain = await call(admin, "GET", "/metrics", token=TOKEN.encode())
    assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# EOF" not in plain.body.decode() and "wsproxy_workers 2.0" in plain.body.decode().splitlines()


def _each_line_names_its_worker(log: str, pids: dict[int, int]) -> None:
    """Every line a worker wrote says ``worker=SLOT`` after ``logger``; the supervisor's say no worker."""
    lines = [parse_pairs(line) for line in log.splitlines() if line.startswith("ts=")]
    by_worker = [pairs for pairs in lines if "worker" in pairs]
    assert {pairs["worker"] for pairs in by_worker} == {"0", "1"}
    for pairs in lines:
        if pairs["logger"] == "wsproxy.supervisor":
            assert "worker" not in pairs, pairs
        elif pairs["event"] == "session_closed_by_admin":  # a worker's line: its slot, also in the session id
            assert pairs["worker"] == re.fullmatch(r"w(\d+)x\w+", pairs["conn"])[1], pairs  # type: ignore[index]
    for slot in pids:
        assert re.search(rf"^ts=\S+ level=\w+ logger=\S+ worker={slot} event=", log, re.M), log


async def _unanswered(proxy: Running, admin: str, pids: dict[int, int]) -> None:
    """A stopped worker is named in ``unanswered``; with both stopped, 504."""
    try:
        os.kill(pids[1], signal.SIGSTOP)
        with trio.fail_after(FANOUT_WAIT_S):
            code, body = await get(admin, "/sessions")
        assert (code, body["unanswered"]) == (200, [1]), body
        done = await proxy.cmd("sessions")
        assert done.returncode == 0, out(done)
        assert "worker(s) 1 did not answer in time" in done.stderr.decode(), out(done)
        os.kill(pids[0], signal.SIGSTOP)
        with trio.fail_after(FANOUT_WAIT_S):
            code, body = await get(admin, "/sessions")
        assert (code, body["unanswered"]) == (504, [0, 1]), body
        with trio.fail_after(FANOUT_WAIT_S):
            reply = await call(admin, "POST", "/identities/alice/close", token=TOKEN.encode())
        assert reply.status == 504, reply
    finally:
        for pid in pids.values():
            os.kill(pid, signal.SIGCONT)
    with trio.fail_after(FANOUT_WAIT_S):
        code, body = await get(admin, "/sessions")
    assert (code, body) == (200, {"sessions": [], "next": None, "unanswered": []})


# -- the status page of the whole proxy ------------------------------------------------------------


@needs_browser
@pytest.mark.timeout(120)
async def test_the_status_page_shows_each_worker(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The Workers table: a row per worker (pid, state, restarts...), a restart seen; no sideways scroll on a phone."""
    backend = await start_ws_backend(nursery)
    port, admin_port = closed_port(), closed_port()
    admin = f"127.0.0.1:{admin_port}"
    text = (
        f"listeners: [{{name: public, bind: '127.0.0.1:{port}'}}]\n"
        f"routes: [{{pool: echo}}]\n"
        f"pools: {{echo: {{backends: [{{address: '127.0.0.1:{backend}'}}]}}}}\n"
        "shutdown: {timeout: 2s, spread: 0s}\n"
        f"admin: {{bind: '{admin}'}}\n"
        "workers: 2\n"
    )
    async with running(tmp_path, text, admin):
        with trio.fail_after(30):
            pids = await workers_ready(admin, token=None)

        def steps(browser: Browser) -> None:
            page = browser.page
            expect(page.locator("#workers-section")).to_be_visible()
            expect(page.locator("#totals-title")).to_have_text("Proxy (2 workers)")
            for slot, pid in pids.items():
                row = page.locator(f'tr[data-worker="{slot}"]')
                expect(row.locator("td.pid")).to_have_text(str(pid))
                expect(row.locator(".badge")).to_have_text("ready")
                expect(row.locator("td.restarts")).to_have_text("0")
                expect(row.locator("td.rss")).to_have_text(re.compile(r"^\d+(\.\d+)? MiB$"))
                expect(row.locator("td.lag")).to_have_text(re.compile(r"^\d+\.\d ms$"))
            os.kill(pids[1], signal.SIGKILL)  # restarted by the supervisor: a new pid, one restart
            restarted = page.locator('tr[data-worker="1"]')
            expect(restarted.locator("td.restarts")).to_have_text("1", timeout=15000)
            expect(restarted.locator(".badge")).to_have_text("ready", timeout=15000)
            expect(restarted.locator("td.pid")).not_to_have_text(str(pids[1]))
            expect(page.locator("#events")).to_contain_text("Worker 1: restarted (pid ")
            browser.screenshot("status-page-workers.png")
            page.set_viewport_size({"width": 375, "height": 667})
            page.wait_for_timeout(1200)
            expect(restarted.locator("td.pid")).to_be_visible()
            no_horizontal_scroll(page)
            browser.screenshot("status-page-workers-phone.png")

        errors = await trio.to_thread.run_sync(partial(with_browser, f"http://{admin}/", steps))
        assert errors == [], errors
