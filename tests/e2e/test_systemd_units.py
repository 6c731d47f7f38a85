"""systemd/wsproxy.service and systemd/wsproxy.socket, checked by systemd's own tools.

- ``systemd-analyze verify`` on both units. It exits 0 even for an unknown key
  or a value it cannot parse (it only warns), so a clean run is exit 0 *and*
  nothing on stderr. It also checks that every ``Exec*=`` binary exists, so
  the units are verified as copies in ``tmp_path`` with ``/opt/wsproxy/bin/wsproxy``
  replaced by this venv's ``wsproxy`` (``--root`` would need a whole system
  tree with ``sysinit.target`` and friends).
- ``systemd-analyze security --offline=true``: overall exposure at most 1.5.
- The contract of the issue, read from the unit files (Type=notify, reload =
  check then SIGHUP, one capability, socket named after a listener).
- With ``app.py`` wired to ``wsproxy.control.systemd``: the notify messages a
  real ``wsproxy run`` sends to a manager's socket, and socket activation by
  ``systemd-socket-activate`` (systemd's own launcher).

What is not here: a real systemd as PID 1 (``tests/systemd_lab.sh``, by hand:
it needs root and systemd-nspawn). The tools are in Debian's ``systemd``
package; without them these tests are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from textwrap import dedent

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.kit.process import run_wsproxy
from tests.kit.servers import closed_port, start_ws_backend
from wsproxy.config.schema import ShutdownConfig

ROOT = Path(__file__).parents[2]
SERVICE = ROOT / "systemd" / "wsproxy.service"
SOCKET = ROOT / "systemd" / "wsproxy.socket"
REFERENCE_CONFIG = ROOT / "conf" / "wsproxy.yaml"
#: Where the units expect wsproxy; replaced by the venv's for ``verify``.
UNIT_BINARY = "/opt/wsproxy/bin/wsproxy"  # the documented venv install (README: Install)
MAX_EXPOSURE = 1.5

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install -y systemd)"
)


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order; repeated keys are kept (ExecReload=...)."""
    found = []
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(path: Path, section: str, key: str) -> list[str]:
    return [v for s, k, v in directives(path) if (s, k) == (section, key)]


def venv_wsproxy() -> str:
    binary = Path(sys.executable).parent / "wsproxy"
    assert binary.exists(), f"no wsproxy script beside {sys.executable}"
    return str(binary)


def copy_units(tmp_path: Path) -> tuple[Path, Path]:
    """Both units in tmp_path, under their own names, with Exec*= pointing at the venv's wsproxy."""
    copies = []
    for unit in (SERVICE, SOCKET):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(UNIT_BINARY, venv_wsproxy()))
        copies.append(copy)
    return copies[0], copies[1]


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *map(str, args)], capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "cat"},
    )


# --- systemd-analyze -------------------------------------------------------------


@needs_analyze
def test_verify_passes_on_both_units(tmp_path: Path) -> None:
    service, socket_unit = copy_units(tmp_path)
    done = analyze("verify", "--man=no", service, socket_unit)
    assert (done.returncode, done.stderr, done.stdout) == (0, "", "")


@needs_analyze
def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above is only worth something if a misspelled key shows up."""
    service, socket_unit = copy_units(tmp_path)
    service.write_text(service.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
    done = analyze("verify", "--man=no", service, socket_unit)
    assert "Unknown key 'ProtectHomes'" in done.stderr


@needs_analyze
def test_security_exposure_is_low() -> None:
    done = analyze("security", "--offline=true", "--no-pager", SERVICE)
    assert done.returncode == 0, done.stderr
    match = re.search(r"Overall exposure level for wsproxy\.service: (\d+\.\d+)", done.stdout)
    assert match, done.stdout
    assert float(match[1]) <= MAX_EXPOSURE, done.stdout


# --- the contract, read from the units ---------------------------------------------


def test_service_is_notify_with_check_then_sighup_reload() -> None:
    assert values(SERVICE, "Service", "Type") == ["notify"]
    assert values(SERVICE, "Service", "NotifyAccess") == ["main"]
    config = "-c /etc/wsproxy/wsproxy.yaml"
    assert values(SERVICE, "Service", "ExecStart") == [f"{UNIT_BINARY} run {config}"]
    assert values(SERVICE, "Service", "ExecReload") == [f"{UNIT_BINARY} check {config}", "/bin/kill -HUP $MAINPID"]
    assert values(SERVICE, "Service", "KillSignal") == ["SIGTERM"]
    assert values(SERVICE, "Service", "WatchdogSec") == ["30s"]


def test_service_stop_timeout_outlasts_the_drain() -> None:
    [timeout] = values(SERVICE, "Service", "TimeoutStopSec")
    assert timeout.endswith("s")
    defaults = ShutdownConfig()
    assert float(timeout[:-1]) > defaults.timeout_s + defaults.spread_s


def test_service_runs_unprivileged_with_one_capability() -> None:
    assert values(SERVICE, "Service", "User") == ["wsproxy"]
    assert values(SERVICE, "Service", "AmbientCapabilities") == ["CAP_NET_BIND_SERVICE"]
    assert values(SERVICE, "Service", "CapabilityBoundingSet") == ["CAP_NET_BIND_SERVICE"]
    assert values(SERVICE, "Service", "RestrictAddressFamilies") == ["AF_INET AF_INET6 AF_UNIX"]
    assert values(SERVICE, "Service", "RuntimeDirectory") == ["wsproxy"]
    assert values(SERVICE, "Service", "IPAddressDeny") == []  # a proxy talks to any address
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "MemoryDenyWriteExecute",
                "LockPersonality", "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID"):
        assert values(SERVICE, "Service", key) == ["yes"], key
    assert values(SERVICE, "Service", "ProtectSystem") == ["strict"]
    assert int(values(SERVICE, "Service", "LimitNOFILE")[0]) >= 65536


def test_socket_is_named_after_a_listener_of_the_reference_config() -> None:
    [name] = values(SOCKET, "Socket", "FileDescriptorName")
    assert re.search(rf"^  - name: {re.escape(name)}$", REFERENCE_CONFIG.read_text(), re.M)
    assert values(SOCKET, "Socket", "Service") == ["wsproxy.service"]
    assert values(SOCKET, "Socket", "ListenStream")


# --- a real wsproxy under a (stand-in) manager ---------------------------------------


class Manager:
    """The manager's end of $NOTIFY_SOCKET: a datagram socket in tmp_path."""

    def __init__(self, sock: trio.socket.SocketType, path: str) -> None:
        self.sock = sock
        self.path = path

    async def next(self, timeout_s: float = 15.0) -> dict[str, str]:
        with trio.fail_after(timeout_s):
            data = await self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().split("\n"))

    async def until(self, key: str, timeout_s: float = 15.0) -> dict[str, str]:
        """The next message that sets ``key`` (watchdog pings in between are skipped)."""
        with trio.fail_after(timeout_s):
            while True:
                message = await self.next()
                if key in message:
                    return message


@asynccontextmanager
async def manager_socket(tmp_path: Path) -> AsyncIterator[Manager]:
    path = str(tmp_path / "notify")
    if len(path) > 100:
        path = f"/tmp/wsproxy-notify-{os.getpid()}-{id(tmp_path)}"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
    try:
        await sock.bind(path)
        yield Manager(sock, path)
    finally:
        sock.close()
        Path(path).unlink(missing_ok=True)


def write_config(tmp_path: Path, port: int, backend_port: int) -> Path:
    path = tmp_path / "wsproxy.yaml"
    path.write_text(dedent(f"""\
        listeners:
          - name: public
            bind: 127.0.0.1:{port}
        routes:
          - pool: echo
        pools:
          echo:
            backends:
              - address: 127.0.0.1:{backend_port}
        """))
    return path


async def echo_once(port: int) -> None:
    with trio.fail_after(15):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            await ws.send_message("ping")
            assert await ws.get_message() == "ping"


GENERATION = re.compile(r"^(\d+) sessions?, config generation (\d+)$")


async def test_run_notifies_ready_reloading_stopping(tmp_path: Path, nursery: trio.Nursery) -> None:
    backend_port = await start_ws_backend(nursery)
    port = closed_port()
    config = write_config(tmp_path, port, backend_port)
    async with manager_socket(tmp_path) as manager:
        env = {**os.environ, "NOTIFY_SOCKET": manager.path, "WATCHDOG_USEC": "1000000"}
        async with run_wsproxy(config, env=env) as proxy:
            ready = await manager.until("READY")
            assert ready["READY"] == "1"
            started = GENERATION.match(ready["STATUS"])
            assert started, ready
            await echo_once(port)  # READY=1 came once the listener accepts

            await manager.until("WATCHDOG")  # WATCHDOG_USEC=1s: a ping every 0.5 s

            proxy.signal(signal.SIGHUP)
            reloading = await manager.until("RELOADING")
            assert reloading["RELOADING"] == "1"
            assert int(reloading["MONOTONIC_USEC"]) > 0
            reloaded = await manager.until("READY")
            generation = GENERATION.match(reloaded["STATUS"])
            assert generation, reloaded
            assert int(generation[2]) == int(started[2]) + 1

            proxy.signal(signal.SIGTERM)
            assert (await manager.until("STOPPING"))["STOPPING"] == "1"
            assert await proxy.wait_exit(15) == 0


SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate is not installed (package systemd)")
async def test_socket_activation_uses_the_passed_socket(tmp_path: Path, nursery: trio.Nursery) -> None:
    """systemd-socket-activate binds the port and execs wsproxy on the first connection.

    The listener's bind is the very address of the passed socket: a wsproxy
    that bound it itself would fail with EADDRINUSE instead of answering.
    """
    assert SOCKET_ACTIVATE is not None
    backend_port = await start_ws_backend(nursery)
    port = closed_port()
    config = write_config(tmp_path, port, backend_port)
    async with manager_socket(tmp_path) as manager:
        argv = [
            SOCKET_ACTIVATE, "-l", f"127.0.0.1:{port}", "--fdname=public", "-E", f"NOTIFY_SOCKET={manager.path}",
            "--", sys.executable, "-m", "wsproxy", "run", "-c", str(config),
        ]
        async with run_wsproxy(config, argv=argv) as proxy:
            await proxy.wait_listening(port)  # until systemd-socket-activate listens
            await echo_once(port)
            assert (await manager.until("READY"))["READY"] == "1"
            proxy.signal(signal.SIGTERM)
            assert await proxy.wait_exit(15) == 0
