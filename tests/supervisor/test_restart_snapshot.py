"""``workers: 2``: a worker restarted while the YAML is being edited serves the config in effect; SIGHUP applies the edit.

The proxy is ``python -m wsproxy run`` with ``workers: 2`` (``tests.kit.process``),
its pool over backend ``a`` of two trio-websocket backends that answer with
their name (``tests.kit.servers.start_backend``). The test edits the YAML
without a reload so that the pool names backend ``b`` (in the main file, or
in the file it includes, with a new file matching the include pattern
beside it), kills worker 0 with SIGKILL, and checks that the restarted
worker starts (a new pid, ready, its listening line, no
``worker_start_failed``) and serves what the supervisor validated: sessions
held until the sessions API places one on worker 0 are all answered by ``a``.
SIGHUP then applies the edited files in both workers: generation 2 in each,
and new sessions on both workers answered by ``b``; a worker killed after
that restarts on the applied config.

A reload's workers apply what the supervisor validated, not what the disk
says when they get to it: with worker 1 stopped (SIGSTOP), SIGHUP; once the
supervisor has loaded (the new listener it opens accepts), the file is
edited again; worker 1 continued (SIGCONT) prepares from the supervisor's
snapshot, so the round commits the config the supervisor loaded.

What a restarted worker does when a file the config only references changed
(the fingerprint differs: it is refused, its slot adopted) is
``test_workers.py``'s ``test_a_slot_whose_worker_cannot_start_is_served_by_a_sibling``.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.kit.process import RELOAD_S, AdminProxy, accepts, addr, run_wsproxy
from tests.kit.servers import NamedBackend, closed_port, start_backend
from tests.kit.wait import until

#: Sessions opened, at most, until both workers hold one (the kernel spreads them by their ports).
MAX_SESSIONS = 40


def main_text(port: int, admin_port: int, backend: int) -> str:
    return (
        f"listeners: [{{name: public, bind: '{addr(port)}'}}]\n"
        "routes: [{pool: echo}]\n"
        f"pools: {{echo: {{backends: [{{address: '{addr(backend)}'}}]}}}}\n"
        f"admin: {{bind: '{addr(admin_port)}'}}\n"
        "shutdown: {timeout: 2s, spread: 0s}\n"
        "workers: 2\n"
    )


def write_main(tmp_path: Path, port: int, admin_port: int, backend: int) -> None:
    """The whole config in one file."""
    (tmp_path / "wsproxy.yaml").write_text(main_text(port, admin_port, backend))


def write_included(tmp_path: Path, port: int, admin_port: int, backend: int) -> None:
    """The pool in ``conf.d/pools.yaml``, included by pattern; the first write is the main file's."""
    pools = tmp_path / "conf.d" / "pools.yaml"
    if pools.exists():  # an edit: the pool moves, and a new file matches the pattern
        (tmp_path / "conf.d" / "timeouts.yaml").write_text("timeouts: {idle: 7m}\n")
    else:
        pools.parent.mkdir()
        text = main_text(port, admin_port, backend)
        pools_line = next(line for line in text.splitlines(keepends=True) if line.startswith("pools:"))
        (tmp_path / "wsproxy.yaml").write_text('include: ["conf.d/*.yaml"]\n' + text.replace(pools_line, ""))
    pools.write_text(f"pools: {{echo: {{backends: [{{address: '{addr(backend)}'}}]}}}}\n")


class Sessions:
    """Sessions held open in the test's nursery, each with the reply to its first message."""

    def __init__(self, port: int, nursery: trio.Nursery) -> None:
        self.port, self.nursery = port, nursery
        self.replies: list[str] = []
        self.scopes: list[trio.CancelScope] = []

    async def open(self) -> None:
        async def hold(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self.scopes.append(scope)
                async with open_websocket_url(f"ws://127.0.0.1:{self.port}/") as ws:
                    await ws.send_message("hi")
                    self.replies.append(str(await ws.get_message()))
                    task_status.started()
                    await trio.sleep_forever()

        await self.nursery.start(hold)

    async def on_both_workers(self, proxy: AdminProxy) -> None:
        """Open sessions until the sessions API lists some on worker 0 and on worker 1."""
        while {i[:3] for i in await session_ids(proxy)} != {"w0x", "w1x"}:
            assert len(self.replies) < MAX_SESSIONS, await session_ids(proxy)
            await self.open()

    def close(self) -> None:
        for scope in self.scopes:
            scope.cancel()


async def session_ids(proxy: AdminProxy) -> list[str]:
    status, body = await proxy.get("/sessions?limit=1000")
    assert status == 200, body
    answer = json.loads(body)
    assert answer["unanswered"] == [] and answer["next"] is None, answer
    return [str(s["id"]) for s in answer["sessions"]]


def no_sessions(proxy: AdminProxy) -> Callable[[], Awaitable[bool]]:
    async def none() -> bool:
        return await session_ids(proxy) == []

    return none


async def ready_workers(proxy: AdminProxy, *, not_pids: frozenset[int] = frozenset(), generation: int = 1) -> list[int]:
    """Poll ``/status`` until both workers serve (none of ``not_pids``) at ``generation``; their pids by slot."""
    seen: dict[str, object] = {}

    async def ready() -> bool:
        assert "event=worker_start_failed" not in proxy.log(), proxy.log()
        try:
            status = await proxy.status()
        except OSError:  # the public port accepts (its socket is open) a moment before the admin listener is bound
            return False
        seen["workers"] = workers = status["workers"]
        return len(workers) == 2 and all(
            w["state"] == "ready" and w["sessions"] is not None and w["pid"] not in not_pids and w["generation"] == generation
            for w in workers
        )

    await until(ready, timeout_s=30, what="both workers ready", poll_s=0.1, show=lambda: seen)
    return [int(w["pid"]) for w in seen["workers"]]  # type: ignore[attr-defined]


@pytest.mark.parametrize("write", [write_main, write_included], ids=["main_file", "included_file"])
async def test_a_restarted_worker_serves_the_config_in_effect_and_sighup_applies_the_edit(
    nursery: trio.Nursery, tmp_path: Path, write: Callable[[Path, int, int, int], None]
) -> None:
    a: NamedBackend = await start_backend(nursery, "a")
    b: NamedBackend = await start_backend(nursery, "b")
    port, admin_port = closed_port(), closed_port()
    write(tmp_path, port, admin_port, a.port)
    async with run_wsproxy(tmp_path / "wsproxy.yaml", kind=AdminProxy, port=port) as proxy:
        proxy.admin_port = admin_port
        with trio.fail_after(90):
            pids = await ready_workers(proxy)
            write(tmp_path, port, admin_port, b.port)  # edited, no SIGHUP
            os.kill(pids[0], signal.SIGKILL)
            await proxy.wait_log(f"event=worker_exited slot=0 pid={pids[0]}")
            restarted = await ready_workers(proxy, not_pids=frozenset({pids[0]}))
            assert restarted[1] == pids[1]
            await proxy.wait_log("worker=0 event=listening", count=2)  # its first start, and this one
            assert "event=worker_start_failed" not in proxy.log()

            before = Sessions(port, nursery)
            await before.on_both_workers(proxy)
            assert set(before.replies) == {"a:hi"}, before.replies  # the restarted worker too: the config in effect
            before.close()
            await until(no_sessions(proxy), what="the held sessions' ends")

            outcome = await proxy.reload()
            assert "event=reloaded generation=2" in outcome, outcome
            await ready_workers(proxy, generation=2)
            after = Sessions(port, nursery)
            await after.on_both_workers(proxy)
            assert set(after.replies) == {"b:hi"}, after.replies  # the edit, in both workers
            after.close()
            await until(no_sessions(proxy), what="the held sessions' ends")

            pids = await ready_workers(proxy, generation=2)
            os.kill(pids[1], signal.SIGKILL)  # a restart after the reload: on the config it applied
            await proxy.wait_log(f"event=worker_exited slot=1 pid={pids[1]}")
            await ready_workers(proxy, not_pids=frozenset({pids[1]}), generation=2)


async def test_a_reload_applies_what_the_supervisor_validated_not_what_the_disk_says_later(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    a: NamedBackend = await start_backend(nursery, "a")
    b: NamedBackend = await start_backend(nursery, "b")
    port, admin_port, added = closed_port(), closed_port(), closed_port()
    write_main(tmp_path, port, admin_port, a.port)
    async with run_wsproxy(tmp_path / "wsproxy.yaml", kind=AdminProxy, port=port) as proxy:
        proxy.admin_port = admin_port
        with trio.fail_after(90):
            pids = await ready_workers(proxy)
            validated = main_text(port, admin_port, a.port).replace(
                "listeners: [", f"listeners: [{{name: added, bind: '{addr(added)}'}}, "
            )
            outcome: list[str] = []

            async def reload() -> None:
                outcome.append(await proxy.reload(validated))

            os.kill(pids[1], signal.SIGSTOP)
            try:
                async with trio.open_nursery() as reloading:
                    reloading.start_soon(reload)
                    await until(lambda: accepts(added), timeout_s=RELOAD_S, what="the new listener's sockets")
                    proxy.write(validated.replace(f":{a.port}'", f":{b.port}'"))  # after the supervisor's load
                    os.kill(pids[1], signal.SIGCONT)
            finally:
                os.kill(pids[1], signal.SIGCONT)
            assert "event=reloaded generation=2" in outcome[0], outcome
            await ready_workers(proxy, generation=2)
            sessions = Sessions(port, nursery)
            await sessions.on_both_workers(proxy)
            assert set(sessions.replies) == {"a:hi"}, sessions.replies  # the config validated, in both workers
            sessions.close()
