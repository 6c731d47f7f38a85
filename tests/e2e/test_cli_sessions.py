"""End to end: ``wsproxy sessions`` and ``wsproxy kick`` against a real ``wsproxy run``.

The proxy is a ``python -m wsproxy run`` subprocess with an admin token and a
route with static tokens; clients are trio-websocket connections that send
those tokens; the commands are subprocesses, as an operator types them
(``tests.kit.process.running`` runs the proxy). Covered: the table and the
JSON, filters, kicking one session and an identity with a code and a reason
(what the client gets), and the failures (unknown session, a code the proxy
may not send, a usage error).
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from tests.kit.process import CLI_TOKEN as TOKEN, out, running, wsproxy_cmd
from tests.kit.servers import closed_port, start_ws_backend
from tests.kit.sessions import CLI_USERS as USERS, cli_config as config, hold

async def test_sessions_and_kick(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    backend = await start_ws_backend(nursery)
    port, admin_port = closed_port(), closed_port()
    async with running(tmp_path, config(port, backend, admin_port), f"127.0.0.1:{admin_port}") as proxy:
        done = await proxy.cmd("sessions")
        assert (done.returncode, done.stdout.decode()) == (0, "no sessions\n"), out(done)
        with trio.fail_after(30):
            _, alice1_ended, alice1 = await hold(port, "alice", nursery)
            _, alice2_ended, alice2 = await hold(port, "alice", nursery)
            _, bob_ended, bob = await hold(port, "bob", nursery)

            done = await proxy.cmd("sessions")
            assert done.returncode == 0, out(done)
            lines = done.stdout.decode().splitlines()
            assert lines[0].split() == ["ID", "PEER", "IDENTITY", "ROUTE", "POOL", "BACKEND", "AGE", "UP", "DOWN"]
            assert [line.split()[2] for line in lines[1:4]] == ["alice", "alice", "bob"]
            assert all(f"*/chat  echo  127.0.0.1:{backend}" in line for line in lines[1:4])
            assert lines[4] == "3 session(s); UP and DOWN are bytes/messages"
            done = await proxy.cmd("sessions", "--identity", "bob", "--json")
            listed = json.loads(done.stdout)["sessions"]
            assert [s["identity"] for s in listed] == ["bob"]
            bob_id = listed[0]["id"]
            done = await proxy.cmd("sessions", "--route", "*/other")
            assert done.stdout.decode() == "no sessions match\n"

            done = await proxy.cmd("kick", "--session", bob_id, "--code", "4000", "--reason", "bye bob")
            assert (done.returncode, done.stdout.decode()) == (0, f"wsproxy: session {bob_id}: closing\n"), out(done)
            await bob_ended.wait()
            assert bob == [4000, "bye bob"]
            done = await proxy.cmd("kick", "--identity", "alice")
            assert done.stdout.decode() == "wsproxy: identity alice: closing 2 session(s)\n", out(done)
            await alice1_ended.wait()
            await alice2_ended.wait()
            assert alice1 == alice2 == [1008, "closed by the operator"]
            log = proxy.log()
            assert log.count("event=session_closed_by_admin") == 3
            assert f"event=session_closed_by_admin conn={bob_id} " in log and 'reason="bye bob"' in log
            assert not any(token in log for token in (*USERS.values(), TOKEN))

            done = await proxy.cmd("kick", "--session", bob_id)
            assert done.returncode == 1
            assert done.stderr.decode() == f"wsproxy kick: no session {bob_id} in the running proxy (it may have ended)\n"
            done = await proxy.cmd("kick", "--identity", "alice", "--code", "1002")
            assert done.returncode == 1
            assert done.stderr.decode().startswith("wsproxy kick: refused: code 1002 is not one a proxy may send")
            done = await proxy.cmd("kick")
            assert done.returncode == 2 and "one of the arguments --session --identity is required" in done.stderr.decode()
            done = await proxy.cmd("kick", "--session", "x", "--identity", "y")
            assert done.returncode == 2
    done = await wsproxy_cmd("sessions", "-c", str(tmp_path / "wsproxy.yaml"))
    assert done.returncode == 1 and "cannot reach the admin API" in done.stderr.decode()
