"""End to end: the operator commands and the health endpoints against a real ``wsproxy run``.

The proxy is ``python -m wsproxy run -c FILE`` in a subprocess (its log in a
file); the commands are ``python -m wsproxy reload|status|drain|undrain -c
FILE`` subprocesses, as an operator types them; backends are trio-websocket
echo servers in the test. The admin listener is TCP with a token, TCP without,
and a unix socket. ``/healthz`` and ``/ready`` are read with the admin tests'
h11 client, with and without a backend available.

What is covered: each command's output and exit status (reload applied: 0;
reload refused: 1 with the located errors; unknown backend, wrong token, no
proxy running: 1 with one line), the health endpoints without a token (and
with one when ``health_needs_token``), ``/ready`` turning 503 with its
reasons when a pool has no available backend, an admin bind failure at start
as one line, bare ``wsproxy``, ``--version``, ``run --help``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import wsproxy
from tests.kit.admin import call
from tests.kit.process import WSPROXY, WsproxyProcess, run_wsproxy
from tests.kit.servers import closed_port, start_ws_backend

TOKEN = "cli-admin-token-0123456789"


async def wsproxy_cmd(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(timeout_s):
        return await trio.run_process([*WSPROXY, *args], capture_stdout=True, capture_stderr=True, check=False)


def config_text(port: int, backends: list[int], admin: str, extra: str = "") -> str:
    listed = ", ".join(f"{{address: '127.0.0.1:{p}'}}" for p in backends)
    return (
        f"listeners: [{{name: public, bind: '127.0.0.1:{port}'}}]\n"
        "routes: [{pool: echo}]\n"
        f"pools: {{echo: {{backends: [{listed}]}}}}\n"
        "shutdown: {timeout: 2s, spread: 0s}\n"
        f"admin: {admin}\n"
        f"{extra}"
    )


class Running(WsproxyProcess):
    """The kit's ``wsproxy run`` with the admin address the commands use."""

    admin = ""

    @property
    def path(self) -> Path:
        return self.config_path

    async def cmd(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        command, *rest = args
        return await wsproxy_cmd(command, "-c", str(self.path), *rest)


@asynccontextmanager
async def running(tmp_path: Path, text: str, admin: str) -> AsyncIterator[Running]:
    path = tmp_path / "wsproxy.yaml"
    path.write_text(text)
    async with run_wsproxy(path, kind=Running) as proxy:
        proxy.admin = admin
        await proxy.wait_log("event=admin_listening")
        yield proxy


def out(done: subprocess.CompletedProcess[bytes]) -> str:
    return done.stdout.decode() + done.stderr.decode()


# -- the commands over TCP with a token ----------------------------------------------------------


async def test_status_drain_undrain_and_reload_over_tcp_with_a_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(TOKEN + "\n")
    backend = await start_ws_backend(nursery)
    port, admin_port = closed_port(), closed_port()
    admin = f"{{bind: '127.0.0.1:{admin_port}', token_file: admin.token}}"
    text = config_text(port, [backend], admin)
    async with running(tmp_path, text, f"127.0.0.1:{admin_port}") as proxy:
        done = await proxy.cmd("status")
        assert done.returncode == 0, out(done)
        assert "generation 1" in done.stdout.decode()
        assert f"127.0.0.1:{backend}" in done.stdout.decode() and "up" in done.stdout.decode()
        done = await proxy.cmd("status", "--json")
        assert json.loads(done.stdout)["generation"] == 1

        done = await proxy.cmd("drain", "echo", f"127.0.0.1:{backend}")
        assert done.returncode == 0, out(done)
        assert done.stdout.decode() == f"wsproxy: echo 127.0.0.1:{backend}: draining\n"
        done = await proxy.cmd("drain", "echo", f"127.0.0.1:{backend}")
        assert done.stdout.decode().endswith("draining (already)\n")
        assert "draining" in (await proxy.cmd("status")).stdout.decode()
        done = await proxy.cmd("undrain", "echo", f"127.0.0.1:{backend}")
        assert done.returncode == 0 and done.stdout.decode() == f"wsproxy: echo 127.0.0.1:{backend}: not draining\n"
        done = await proxy.cmd("drain", "echo", "127.0.0.1:1")
        assert done.returncode == 1
        assert done.stderr.decode() == "wsproxy drain: no backend 127.0.0.1:1 in pool echo of the running config\n"

        # reload: a good config is applied (exit 0), a broken one refused with its located errors (exit 1)
        second = await start_ws_backend(nursery)
        proxy.path.write_text(config_text(port, [backend, second], admin))
        done = await proxy.cmd("reload")
        assert done.returncode == 0, out(done) + proxy.log()
        assert done.stdout.decode() == "wsproxy: reloaded: config generation 2\n"
        assert f"127.0.0.1:{second}" in (await proxy.cmd("status")).stdout.decode()
        proxy.path.write_text(config_text(port, [backend], admin).replace("routes: [{pool: echo}]", "routes: [{pool: ech}]"))
        done = await proxy.cmd("reload")
        assert done.returncode == 1, out(done)
        errors = done.stderr.decode()
        assert f'{proxy.path}:2:17: routes[0].pool: route names pool "ech", which is not defined' in errors, errors
        assert "reload refused (1 error(s)); the old config keeps serving" in errors
        assert json.loads((await proxy.cmd("status", "--json")).stdout)["generation"] == 2
        assert "event=reload_requested by=admin" in proxy.log()

        # the health endpoints need no token; the rest does
        assert (await call(proxy.admin, "GET", "/healthz")).status == 200
        ready = await call(proxy.admin, "GET", "/ready")
        assert ready.status == 200 and ready.json() == {"ready": True, "reasons": [], "pools": {"echo": 2}}
        assert (await call(proxy.admin, "GET", "/status")).status == 401
        assert (await call(proxy.admin, "POST", "/reload")).status == 401
        assert TOKEN not in proxy.log()

    # a token that does not match the running proxy's, and no proxy at all
    (tmp_path / "admin.token").write_text("another-token-0123456789\n")
    async with running(tmp_path, text, f"127.0.0.1:{admin_port}") as proxy:
        (tmp_path / "admin.token").write_text(TOKEN + "\n")
        done = await proxy.cmd("status")
        assert done.returncode == 1
        assert "refused the token (401)" in done.stderr.decode()
    done = await wsproxy_cmd("reload", "-c", str(tmp_path / "wsproxy.yaml"))
    assert done.returncode == 1
    assert done.stderr.decode() == (
        f"wsproxy reload: cannot reach the admin API at 127.0.0.1:{admin_port}: Connection refused (is wsproxy running?)\n"
    )


# -- unix socket, no token -----------------------------------------------------------------------


async def test_the_commands_over_a_unix_socket_and_reload_while_the_rest_of_the_file_is_broken(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    backend = await start_ws_backend(nursery)
    port = closed_port()
    socket_path = tmp_path / "admin.sock"
    admin = f"{{bind: 'unix:{socket_path}'}}"
    async with running(tmp_path, config_text(port, [backend], admin), f"unix:{socket_path}") as proxy:
        done = await proxy.cmd("drain", "echo", f"127.0.0.1:{backend}")
        assert done.returncode == 0, out(done)
        assert (await call(proxy.admin, "GET", "/ready")).status == 503
        done = await proxy.cmd("undrain", "echo", f"127.0.0.1:{backend}")
        assert done.returncode == 0, out(done)
        done = await proxy.cmd("reload")
        assert done.returncode == 0 and "generation 2" in done.stdout.decode(), out(done)
        # the command reads only the admin section: it reaches the proxy, which reports the rest
        proxy.path.write_text(config_text(port, [backend], admin) + "timeouts: {idle: forever}\n")
        done = await proxy.cmd("reload")
        assert done.returncode == 1
        assert "timeouts.idle" in done.stderr.decode(), out(done)


# -- /healthz and /ready -------------------------------------------------------------------------


async def test_ready_is_503_with_reasons_until_a_backend_is_up(nursery: trio.Nursery, tmp_path: Path) -> None:
    port, admin_port, down = closed_port(), closed_port(), closed_port()
    health = "{type: tcp, interval: 100ms, timeout: 1s, rise: 1, fall: 1}"
    text = (
        f"listeners: [{{name: public, bind: '127.0.0.1:{port}'}}]\n"
        "routes: [{path: /chat, pool: chat}, {pool: echo}]\n"
        f"pools:\n  chat: {{health: {health}, backends: [{{address: '127.0.0.1:{down}'}}]}}\n"
        f"  echo: {{backends: [{{address: '127.0.0.1:{closed_port()}'}}]}}\n"
        "shutdown: {timeout: 2s, spread: 0s}\n"
        f"admin: {{bind: '127.0.0.1:{admin_port}'}}\n"
    )
    async with running(tmp_path, text, f"127.0.0.1:{admin_port}") as proxy:
        assert (await call(proxy.admin, "GET", "/healthz")).status == 200
        ready = await call(proxy.admin, "GET", "/ready")
        assert ready.status == 503
        assert ready.json() == {"ready": False, "reasons": ["pool chat has no available backend"], "pools": {"chat": 0, "echo": 1}}
        # the backend comes up: its health check passes, and the process is ready
        with socket.socket() as listening:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.bind(("127.0.0.1", down))
            listening.listen(16)
            with trio.fail_after(10):
                while (await call(proxy.admin, "GET", "/ready")).status != 200:
                    await trio.sleep(0.05)
        # admin.ready_pools narrows what counts: with only echo, a chat pool down is still ready
        proxy.path.write_text(text.replace(f"admin: {{bind: '127.0.0.1:{admin_port}'}}", f"admin: {{bind: '127.0.0.1:{admin_port}', ready_pools: [echo]}}"))
        assert (await proxy.cmd("reload")).returncode == 0
        with trio.fail_after(10):
            while (await call(proxy.admin, "GET", "/status")).json()["pools"]["chat"]["backends"][0]["health"] != "down":  # type: ignore[index]
                await trio.sleep(0.05)
        ready = await call(proxy.admin, "GET", "/ready")
        assert ready.status == 200 and ready.json()["pools"] == {"echo": 1}


async def test_health_needs_token_puts_the_health_endpoints_behind_the_token(nursery: trio.Nursery, tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text(TOKEN)
    backend = await start_ws_backend(nursery)
    admin_port = closed_port()
    admin = f"{{bind: '127.0.0.1:{admin_port}', token_file: admin.token, health_needs_token: true}}"
    async with running(tmp_path, config_text(closed_port(), [backend], admin), f"127.0.0.1:{admin_port}") as proxy:
        for path in ("/healthz", "/ready"):
            assert (await call(proxy.admin, "GET", path)).status == 401
            assert (await call(proxy.admin, "GET", path, token=TOKEN.encode())).status == 200
        assert (await call(proxy.admin, "POST", "/healthz", token=TOKEN.encode())).status == 405


# -- start-up and help ---------------------------------------------------------------------------


async def test_an_admin_bind_failure_at_start_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin_port = taken.getsockname()[1]
        path = tmp_path / "wsproxy.yaml"
        path.write_text(config_text(closed_port(), [9001], f"{{bind: '127.0.0.1:{admin_port}'}}"))
        done = await wsproxy_cmd("run", "-c", str(path))
    assert done.returncode == 1
    lines = [line for line in done.stderr.decode().splitlines() if "Traceback" in line or line.startswith("wsproxy:")]
    assert lines == [f"wsproxy: admin.bind: cannot listen on 127.0.0.1:{admin_port}: Address already in use"], done.stderr.decode()


async def test_bare_wsproxy_prints_help_and_version_shows_the_stack() -> None:
    done = await wsproxy_cmd()
    assert done.returncode == 2
    assert "usage: wsproxy" in done.stdout.decode() and "reload" in done.stdout.decode()
    done = await wsproxy_cmd("--version")
    lines = done.stdout.decode().splitlines()
    assert lines[0] == f"wsproxy {wsproxy.__version__}"
    assert lines[1].startswith(f"Python {sys.version.split()[0]}")
    assert lines[2] == f"trio {trio.__version__}"
    assert lines[3].startswith("OpenSSL ")
    done = await wsproxy_cmd("run", "--help")
    text = done.stdout.decode()
    assert done.returncode == 0
    for needle in ("SIGHUP", "SIGTERM", "Exit status", "/etc/wsproxy/wsproxy.yaml"):
        assert needle in text, text


async def test_c_defaults_to_etc_wsproxy(tmp_path: Path) -> None:
    done = await wsproxy_cmd("status")
    if Path("/etc/wsproxy/wsproxy.yaml").exists():
        pytest.skip("this machine has a /etc/wsproxy/wsproxy.yaml")
    assert done.returncode == 1
    assert "/etc/wsproxy/wsproxy.yaml" in done.stderr.decode()


def test_the_man_page_is_up_to_date() -> None:
    from wsproxy.manpage import PAGE, render

    assert PAGE.read_text() == render(), "man/wsproxy.1 is stale: run python -m wsproxy.manpage"
