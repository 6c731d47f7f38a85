"""``wsproxy run`` as a real process: the one harness every process test uses.

``run_wsproxy(config_path)`` starts ``python -m wsproxy run -c FILE`` with
stdout and stderr in one log file beside the config, and yields a
``WsproxyProcess``: wait for ports or log lines, read the log as it grows,
send signals, wait for the exit status. Leaving the ``async with`` stops a
process still running with SIGTERM and a bounded wait, then SIGKILL, and
always reaps it, even when the test was cancelled (the wait is shielded).

The child runs the tree under test: the repository root is put first on its
``PYTHONPATH``, so a worktree's code wins over an installed copy.

``run_proxy`` is the same for a config given as a dict (``make_config``),
with the admin API's helpers on ``AdminProxy`` (``reload`` by SIGHUP and its
outcome line, ``/status``, ``/metrics``).

What is not here: in-process proxies (``tests.kit.servers.start_proxy``) and
the one-shot commands (``check``, ``reload``): those are ``trio.run_process``
calls that need no harness.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio
import yaml

#: The command line of the proxy under test.
WSPROXY = [sys.executable, "-m", "wsproxy"]
#: The repository root (so the child imports this tree's ``wsproxy`` and ``tests``).
ROOT = Path(__file__).resolve().parents[2]

#: How long a proxy may take to start listening (imports, config load, binds) on a busy machine.
START_S = 15.0
#: How long one reload may take, SIGHUP to its outcome line (config load in a thread included).
RELOAD_S = 5.0

OUTCOME = re.compile(r"event=reloaded |action=kept_old_config")


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) with the repository root first on PYTHONPATH."""
    base = dict(os.environ if env is None else env)
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    return base


def write_config(tmp_path: Path, text: str, name: str = "wsproxy.yaml") -> Path:
    """Write a config text (dedented) to ``tmp_path/name``; return its path."""
    from textwrap import dedent

    path = tmp_path / name
    path.write_text(dedent(text))
    return path


async def accepts(port: int) -> bool:
    """Whether something accepts TCP on 127.0.0.1:``port`` now."""
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return False
    await stream.aclose()
    return True


class WsproxyProcess:
    """A ``wsproxy run`` subprocess and its log (stdout and stderr, in one file)."""

    def __init__(self, proc: subprocess.Popen[bytes], config_path: Path, log_path: Path) -> None:
        self.proc = proc
        self.config_path = config_path
        self.log_path = log_path
        self.port = 0  # the public listener's port, when run_wsproxy was given one

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        """The whole log so far."""
        return self.log_path.read_text(errors="replace")

    def lines(self, needle: str) -> list[str]:
        """The log lines so far that contain ``needle``."""
        return [line for line in self.log().splitlines() if needle in line]

    def assert_running(self) -> None:
        assert self.proc.poll() is None, f"wsproxy exited with {self.proc.returncode}:\n{self.log()}"

    def assert_clean(self) -> None:
        log = self.log()
        assert "Traceback" not in log and "event=error" not in log, log

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    async def wait_listening(self, *ports: int, timeout_s: float = START_S) -> None:
        """Until every port in ``ports`` accepts (and the process still runs)."""
        with trio.fail_after(timeout_s):
            for port in ports:
                while not await accepts(port):
                    self.assert_running()
                    await trio.sleep(0.02)

    async def wait_log(self, pattern: str | re.Pattern[str], *, count: int = 1, timeout_s: float = START_S) -> str:
        """Until the log holds ``count`` matches of ``pattern`` (a regex or plain text); the log then."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(re.escape(pattern))
        try:
            with trio.fail_after(timeout_s):
                while len(regex.findall(log := self.log())) < count:
                    self.assert_running()
                    await trio.sleep(0.02)
        except trio.TooSlowError:
            raise AssertionError(f"no {count} x {regex.pattern!r} in the log after {timeout_s}s:\n{self.log()}") from None
        return log

    async def wait_exit(self, timeout_s: float) -> int:
        """The exit status, once the process has ended within ``timeout_s``."""
        try:
            with trio.fail_after(timeout_s):
                while self.proc.poll() is None:
                    await trio.sleep(0.01)
        except trio.TooSlowError:
            raise AssertionError(f"wsproxy still running after {timeout_s}s:\n{self.log()}") from None
        return self.proc.returncode

    async def stop(self, timeout_s: float = 5.0) -> int:
        """SIGTERM if it still runs, wait up to ``timeout_s``, then SIGKILL; always reaped. The exit status."""
        status: int | None = None
        with trio.CancelScope(shield=True):  # a cancelled test must not leave the process behind
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    await trio.to_thread.run_sync(self.proc.wait, timeout_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            status = await trio.to_thread.run_sync(self.proc.wait)
        assert status is not None
        return status


P = TypeVar("P", bound=WsproxyProcess)


@asynccontextmanager
async def run_wsproxy(
    config_path: Path,
    *,
    kind: type[P] = WsproxyProcess,  # type: ignore[assignment]
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    stop_timeout_s: float = 5.0,
    port: int = 0,
    **popen: Any,
) -> AsyncIterator[P]:
    """Start ``wsproxy run -c config_path`` (or ``argv``); stop and reap it on the way out.

    With ``port`` (the config's public listener), it is yielded once that port
    accepts, as ``proxy.port``. The log goes to ``log_path`` (default:
    ``wsproxy.log`` beside the config); ``popen`` is passed on (``pass_fds``,
    ``preexec_fn``).
    """
    log_path = log_path or config_path.with_name("wsproxy.log")
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            list(argv) if argv is not None else [*WSPROXY, "run", "-c", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=child_env(env), **popen,
        )  # fmt: skip
    proxy = kind(proc, config_path, log_path)
    try:
        if port:
            proxy.port = port
            await proxy.wait_listening(port)
        yield proxy
    finally:
        await proxy.stop(stop_timeout_s)


# -- configs as dicts, and a proxy with its admin API ---------------------------------------------


def addr(port: int) -> str:
    return f"127.0.0.1:{port}"


def pool(*ports: int, **settings: Any) -> dict[str, Any]:
    """A pool mapping over loopback ``ports``, with more ``settings``."""
    return {**settings, "backends": [{"address": addr(p)} for p in ports]}


def make_config(
    *,
    listeners: Mapping[str, int | dict[str, Any]],
    pools: dict[str, dict[str, Any]],
    routes: list[tuple[str, str]],
    admin_port: int,
    **sections: Any,
) -> dict[str, Any]:
    """A config as a dict: ``listeners`` maps names to a port (or a full mapping), routes are (path, pool)."""
    return {
        "listeners": [
            {"name": name, "bind": addr(spec)} if isinstance(spec, int) else {"name": name, **spec}
            for name, spec in listeners.items()
        ],
        "routes": [{"path": path, "pool": name} for path, name in routes],
        "pools": pools,
        "admin": {"bind": addr(admin_port)},
        "shutdown": {"timeout": "3s", "spread": "0s"},
        **sections,
    }


class AdminProxy(WsproxyProcess):
    """A ``wsproxy run`` started from a dict config with an admin API on ``admin_port``."""

    admin_port: int = 0

    def write(self, config: dict[str, Any] | str) -> None:
        """Replace the config file atomically (a reload never reads half a file)."""
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        tmp = self.config_path.with_name(self.config_path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    async def reload(self, config: dict[str, Any] | str | None = None) -> str:
        """Write ``config`` (if given), SIGHUP, and return the log written by that reload.

        Never send the next SIGHUP before this returns: trio coalesces a signal
        that arrives while the same one is pending.
        """
        if config is not None:
            self.write(config)
        before = self.log()
        outcomes = len(OUTCOME.findall(before))
        os.kill(self.proc.pid, signal.SIGHUP)
        with trio.fail_after(RELOAD_S):
            while True:
                self.assert_running()
                text = self.log()
                if len(OUTCOME.findall(text)) > outcomes:
                    return text[len(before) :]
                await trio.sleep(0.005)

    async def get(self, target: str) -> tuple[int, bytes]:
        """GET ``target`` from the admin API: (status, body)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.admin_port)
        async with stream:
            await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.admin_port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body

    async def status(self) -> dict[str, Any]:
        code, body = await self.get("/status")
        assert code == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    async def metric(self, name: str) -> float:
        code, body = await self.get("/metrics")
        assert code == 200, body
        for line in body.decode().splitlines():
            if line.split(" ")[0] == name:
                return float(line.split(" ")[1])
        raise AssertionError(f"no {name} in /metrics:\n{body.decode()}")

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


@asynccontextmanager
async def run_proxy(
    tmp_path: Path, config: dict[str, Any], *, ports: list[int], stop_timeout_s: float = 5.0, **popen: Any
) -> AsyncIterator[AdminProxy]:
    """Start ``wsproxy run`` on the dict ``config``; yield once ``ports`` and the admin port accept."""
    config_path = tmp_path / "wsproxy.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    async with run_wsproxy(config_path, kind=AdminProxy, stop_timeout_s=stop_timeout_s, **popen) as proxy:
        proxy.admin_port = int(config["admin"]["bind"].rsplit(":", 1)[1])
        await proxy.wait_listening(*ports, proxy.admin_port)
        yield proxy
