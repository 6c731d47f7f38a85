"""Files named by the config that would hang or exhaust the loader, on real processes (issue 15, item 10).

``wsproxy check`` and ``wsproxy run`` subprocesses; the files are real: the
character device ``/dev/zero``, a FIFO that nobody writes (``os.mkfifo``), a
directory, a regular file over the size cap. Each is a located config error
(``FILE:LINE:COL: path: ... is not a regular file``), never a hang, a
``MemoryError`` or a traceback. A reload that cannot finish within
``timeouts.reload`` is abandoned while the old config keeps serving, and
SIGTERM always shuts the proxy down, also while a reload is still loading.

The slow reload is real too: a config padded with a large YAML flow list,
which PyYAML's pure-Python composer takes seconds to read.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml
from trio_websocket import open_websocket_url

from tests.kit.process import WSPROXY, make_config, run_proxy
from tests.kit.servers import closed_port, start_backend


#: What each kind of bad file is called in the error.
KINDS = {
    "dev-zero": "is not a regular file (a character device)",
    "fifo": "is not a regular file (a FIFO)",
    "directory": "is not a regular file (a directory)",
    "too-large": "over the limit of 1 MiB",
}


def bad_file(tmp_path: Path, kind: str) -> str:
    if kind == "dev-zero":
        return "/dev/zero"
    path = tmp_path / f"bad-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"x" * (1024 * 1024 + 1))
    return str(path)


def config_text(token_file: str, **extra: Any) -> str:
    """A minimal config whose admin section names ``token_file``."""
    config = {
        "listeners": [{"name": "main", "bind": "127.0.0.1:0"}],
        "routes": [{"path": "/", "pool": "echo"}],
        "pools": {"echo": {"backends": [{"address": "127.0.0.1:9"}]}},
        "admin": {"bind": "127.0.0.1:0", "token_file": token_file},
        **extra,
    }
    return yaml.safe_dump(config, sort_keys=False)


@pytest.mark.parametrize("kind", list(KINDS))
def test_check_reports_a_bad_admin_token_file_with_its_position(tmp_path: Path, kind: str) -> None:
    path = bad_file(tmp_path, kind)
    config = tmp_path / "wsproxy.yaml"
    config.write_text(config_text(path))
    result = subprocess.run(
        [*WSPROXY, "check", "-c", str(config)], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out and "MemoryError" not in out, out
    line = next(line for line in out.splitlines() if KINDS[kind] in line)
    # FILE:LINE:COL: YAML path: message naming the file
    assert re.match(rf"{re.escape(str(config))}:\d+:\d+: admin\.token_file: {re.escape(path)} ", line), line


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_check_reports_a_bad_route_tokens_file(tmp_path: Path, kind: str) -> None:
    path = bad_file(tmp_path, kind)
    config = tmp_path / "wsproxy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listeners": [{"name": "main", "bind": "127.0.0.1:0"}],
                "routes": [{"path": "/", "pool": "echo", "auth": {"tokens_file": path}}],
                "pools": {"echo": {"backends": [{"address": "127.0.0.1:9"}]}},
            }
        )
    )
    result = subprocess.run(
        [*WSPROXY, "check", "-c", str(config)], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in out, out
    assert re.search(rf":\d+:\d+: routes\[0\]\.auth\.tokens_file: {re.escape(path)} {re.escape(KINDS[kind])}", out), out


def test_check_refuses_a_fifo_as_tls_certificate(tmp_path: Path) -> None:
    fifo = bad_file(tmp_path, "fifo")
    config = tmp_path / "wsproxy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listeners": [{"name": "main", "bind": "127.0.0.1:0", "tls": {"cert": fifo, "key": fifo}}],
                "routes": [{"path": "/", "pool": "echo"}],
                "pools": {"echo": {"backends": [{"address": "127.0.0.1:9"}]}},
            }
        )
    )
    result = subprocess.run(
        [*WSPROXY, "check", "-c", str(config)], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in out, out
    assert re.search(r":\d+:\d+: listeners\[0\]\.tls\.cert: .* is not a regular file \(a FIFO\)", out), out


def test_the_config_file_itself_may_not_be_a_fifo(tmp_path: Path) -> None:
    config = tmp_path / "wsproxy.yaml"
    os.mkfifo(config)
    result = subprocess.run(
        [*WSPROXY, "check", "-c", str(config)], capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in out, out
    assert "is not a regular file (a FIFO)" in out, out


# --- on a running proxy -----------------------------------------------------------------------


async def echo_through(port: int) -> str:
    with trio.fail_after(5):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            await ws.send_message("ping")
            return str(await ws.get_message())


async def test_reload_with_a_bad_token_file_keeps_serving_and_sigterm_still_works(nursery: trio.Nursery, tmp_path: Path) -> None:
    """/dev/zero, a FIFO nobody writes, a directory: each reload fails at once; the old config serves."""
    backend = await start_backend(nursery, "b1")
    port, admin_port = closed_port(), closed_port()
    token = tmp_path / "admin.token"
    token.write_text("t" * 32)
    config = make_config(
        listeners={"main": port}, pools={"echo": {"backends": [{"address": f"127.0.0.1:{backend.port}"}]}},
        routes=[("/", "echo")], admin_port=admin_port,
    )
    config["admin"]["token_file"] = str(token)
    async with run_proxy(tmp_path, config, ports=[port]) as proxy:
        assert await echo_through(port) == "b1:ping"
        for kind in ("dev-zero", "fifo", "directory", "too-large"):
            path = bad_file(tmp_path, kind)
            config["admin"]["token_file"] = path
            output = await proxy.reload(config)  # fails within RELOAD_S, or the test fails
            assert "action=kept_old_config" in output, output
            assert f"admin.token_file: {path} " in output and KINDS[kind] in output, output
            proxy.assert_running()
            assert await echo_through(port) == "b1:ping"
        proxy.assert_clean()
        proxy.proc.send_signal(signal.SIGTERM)
        assert await proxy.wait_exit(10) == 0


def slow_config(config: dict[str, Any], items: int) -> str:
    """``config`` plus a large flow list under an unknown key: seconds of YAML composing, then an error."""
    padding = "x-padding:\n" + "".join(f"  - [a{i}, b, c, d, e, f, g, h]\n" for i in range(items))
    return yaml.safe_dump(config, sort_keys=False) + padding


async def test_a_reload_past_its_deadline_is_abandoned_and_the_old_config_serves(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, "b1")
    port, admin_port = closed_port(), closed_port()
    config = make_config(
        listeners={"main": port}, pools={"echo": {"backends": [{"address": f"127.0.0.1:{backend.port}"}]}},
        routes=[("/", "echo")], admin_port=admin_port, timeouts={"reload": "300ms"},
    )
    async with run_proxy(tmp_path, config, ports=[port]) as proxy:
        proxy.write(slow_config(config, 10000))  # seconds of composing
        output = await proxy.reload()
        assert "loading did not finish within 0.3s (timeouts.reload); abandoned" in output, output
        assert "action=kept_old_config" in output, output
        assert await echo_through(port) == "b1:ping"
        # The abandoned loader is still busy: a reload now fails at once instead of starting another.
        proxy.write(config)
        output = await proxy.reload()
        assert "still stuck" in output or "event=reloaded" in output, output
        proxy.proc.send_signal(signal.SIGTERM)
        assert await proxy.wait_exit(5) == 0


async def test_sigterm_during_a_slow_reload_shuts_down_at_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    backend = await start_backend(nursery, "b1")
    port, admin_port = closed_port(), closed_port()
    config = make_config(
        listeners={"main": port}, pools={"echo": {"backends": [{"address": f"127.0.0.1:{backend.port}"}]}},
        routes=[("/", "echo")], admin_port=admin_port,
    )
    async with run_proxy(tmp_path, config, ports=[port]) as proxy:
        proxy.write(slow_config(config, 15000))  # several seconds of composing
        os.kill(proxy.proc.pid, signal.SIGHUP)
        with trio.fail_after(5):
            while "action=reload" not in proxy.log():
                await trio.sleep(0.01)
        await trio.sleep(0.3)  # the loader thread is composing YAML now
        assert await echo_through(port) == "b1:ping"  # and the proxy serves meanwhile
        start = trio.current_time()
        proxy.proc.send_signal(signal.SIGTERM)
        assert await proxy.wait_exit(3) == 0
        elapsed = trio.current_time() - start
        assert "event=reloaded" not in proxy.log() and "kept_old_config" not in proxy.log(), proxy.log()
        assert elapsed < 3
