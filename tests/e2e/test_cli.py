"""End-to-end tests of the ``wsproxy`` command, run as a real subprocess.

``python -m wsproxy`` is started with configs written to ``tmp_path``; the
backend (a trio-websocket echo server) and the clients run in the test. Signals
are real ``os.kill`` calls. The port of ``run`` cannot be 0 here (the test could
not learn it), so it is a free port found by binding and releasing a socket.
What is not here: SIGHUP reloads (not implemented yet).
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.kit.process import WSPROXY, WsproxyProcess, run_wsproxy, write_config
from tests.kit.servers import closed_port, start_ws_backend
from tests.kit.ws import UPGRADE_REQUEST
import wsproxy
from wsproxy._mypyc import describe

#: How long the proxy may take to stop after a signal when nothing holds it up.
EXIT_S = 4.0

#: Shutdown deadline (shutdown.timeout in run_config); sessions' closes are not spread.
SHUTDOWN_DEADLINE_S = 6.0


def run_config(listen_port: int, backend_port: int) -> str:
    return f"""\
        listeners:
          - name: public
            bind: 127.0.0.1:{listen_port}
        routes:
          - pool: echo
        pools:
          echo:
            backends:
              - address: 127.0.0.1:{backend_port}
        timeouts:
          handshake: 5s
        shutdown:
          timeout: 6s
          spread: 0s
        """


async def wsproxy_cmd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [*WSPROXY, *args], capture_stdout=True, capture_stderr=True, check=False, cwd=cwd
        )


# --- --version and check ---------------------------------------------------------


async def test_version() -> None:
    done = await wsproxy_cmd("--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert lines[0] == f"wsproxy {wsproxy.__version__}"  # then Python, trio, OpenSSL, the frame scanner
    # The scanner lines are the ones this process's own import gives (same tree, same build).
    assert lines[-2:] == describe().splitlines()
    assert lines[-2].startswith(("frame scanner: compiled (mypyc)", "frame scanner: pure Python"))


async def test_check_accepts_a_valid_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, run_config(8080, 9001))
    done = await wsproxy_cmd("check", "-c", str(path))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""


async def test_check_accepts_the_reference_config() -> None:
    reference = Path(__file__).parents[2] / "conf" / "wsproxy.yaml"
    done = await wsproxy_cmd("check", "-c", str(reference))
    assert done.returncode == 0, done.stderr.decode()


ERROR_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<path>[\w.\[\]]+): (?P<message>.+)$")


async def test_check_reports_every_error_with_its_position(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        """\
        listeners:
          - name: public
            bind: 127.0.0.1:notaport
        routes:
          - pool: echo
        pools:
          echo:
            backends:
              - address: 127.0.0.1:9001
        timeouts:
          idle: 600
          handshak: 10s
        """,
        name="bad.yaml",
    )
    done = await wsproxy_cmd("check", "-c", "bad.yaml", cwd=tmp_path)
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 1, output
    matches = [m for m in map(ERROR_LINE.match, output.splitlines()) if m]
    assert len(matches) == 3, output
    found = {(m["file"], int(m["line"]), int(m["col"]), m["path"]) for m in matches}
    assert found == {
        ("bad.yaml", 3, 11, "listeners[0].bind"),  # the value "127.0.0.1:notaport"
        ("bad.yaml", 11, 9, "timeouts.idle"),  # the value 600
        ("bad.yaml", 12, 3, "timeouts"),  # the key "handshak"
    }, output
    by_path = {m["path"]: m["message"] for m in matches}
    assert "notaport" in by_path["listeners[0].bind"]
    assert "600" in by_path["timeouts.idle"]
    assert "handshak" in by_path["timeouts"]


async def test_run_refuses_a_broken_config_without_listening(tmp_path: Path) -> None:
    port = closed_port()
    path = write_config(tmp_path, run_config(port, 9001).replace("pool: echo", "pool: ehco"))
    done = await wsproxy_cmd("run", "-c", str(path))
    output = done.stderr.decode()
    assert done.returncode == 1, output
    assert re.search(r"^\S+:\d+:\d+: routes\[0\]\.pool: .*ehco", output, re.M), output


# --- run and signals -------------------------------------------------------------


@asynccontextmanager
async def wsproxy_run(tmp_path: Path, backend_port: int) -> AsyncIterator[WsproxyProcess]:
    """``wsproxy run`` on ``run_config`` with a free port, by the kit's harness; yielded once it listens."""
    port = closed_port()
    async with run_wsproxy(write_config(tmp_path, run_config(port, backend_port)), port=port) as proxy:
        yield proxy


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_with_1001_and_exits_0(nursery: trio.Nursery, tmp_path: Path, signum: int) -> None:
    with trio.fail_after(30):
        backend_port = await start_ws_backend(nursery)
        async with wsproxy_run(tmp_path, backend_port) as proxy:
            async with open_websocket_url(f"ws://127.0.0.1:{proxy.port}/chat") as ws:
                await ws.send_message("through the subprocess")
                assert await ws.get_message() == "through the subprocess"

                proxy.signal(signum)
                with trio.fail_after(EXIT_S):
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                reason = closed.value.reason
                assert reason is not None and reason.code == 1001, proxy.log()

            status = await proxy.wait_exit(EXIT_S)
            log = proxy.log()
            assert status == 0, log
            name = signal.Signals(signum).name
            assert f"event=signal signal={name} action=shutdown" in log
            assert "Traceback" not in log, log


async def open_raw_session(port: int) -> trio.SocketStream:
    """A WebSocket session by hand: upgrade, then one echoed frame. This client
    will never answer a close frame unless the test does it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(UPGRADE_REQUEST)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        assert data, f"closed during the handshake: {buf!r}"
        buf += data
    assert buf.startswith(b"HTTP/1.1 101 "), buf
    assert buf.endswith(b"\r\n\r\n"), "the proxy sent frames before the client spoke"
    payload = b"ping"
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    await stream.send_all(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    assert await receive_frame(stream) == (0x1, payload)
    return stream


async def receive_frame(stream: trio.SocketStream) -> tuple[int, bytes]:
    """One unmasked frame with a short payload: (opcode, payload)."""
    buf = b""
    while len(buf) < 2 or len(buf) < 2 + (buf[1] & 0x7F):
        data = await stream.receive_some(65536)
        assert data, f"connection closed after {buf!r}"
        buf += data
    assert buf[1] & 0x80 == 0, "a server frame must not be masked"
    length = buf[1] & 0x7F
    assert length < 126
    assert len(buf) == 2 + length, f"unexpected bytes after the frame: {buf!r}"
    return buf[0] & 0x0F, buf[2:]


async def receive_close_code(stream: trio.SocketStream) -> int:
    opcode, payload = await receive_frame(stream)
    assert opcode == 0x8, (opcode, payload)
    return int(struct.unpack("!H", payload[:2])[0])


async def assert_not_accepting(port: int) -> None:
    with pytest.raises(OSError):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.aclose()


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_second_signal_while_closing_exits_at_once(nursery: trio.Nursery, tmp_path: Path, second: int) -> None:
    with trio.fail_after(30):
        backend_port = await start_ws_backend(nursery)
        async with wsproxy_run(tmp_path, backend_port) as proxy:
            stream = await open_raw_session(proxy.port)
            async with stream:
                proxy.signal(signal.SIGTERM)
                with trio.fail_after(EXIT_S):
                    assert await receive_close_code(stream) == 1001
                first_signal = trio.current_time()
                # We never answer the close: the session holds the process up...
                await trio.sleep(0.5)
                assert proxy.proc.poll() is None, f"exited before the session ended:\n{proxy.log()}"
                await assert_not_accepting(proxy.port)  # ...but it no longer accepts

                proxy.signal(second)
                start = trio.current_time()
                status = await proxy.wait_exit(1.5)
                elapsed = trio.current_time() - start
                with trio.fail_after(2):
                    rest = b""
                    while chunk := await stream.receive_some(65536):
                        rest += chunk
            log = proxy.log()
            assert trio.current_time() - first_signal < SHUTDOWN_DEADLINE_S - 2, log
            assert elapsed < 1.5
            assert rest == b"", rest
            assert status == 0, log
            assert f"event=signal signal={signal.Signals(second).name} action=exit_now" in log, log


async def test_a_client_that_never_answers_the_close_cannot_hold_shutdown_past_the_deadline(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        backend_port = await start_ws_backend(nursery)
        async with wsproxy_run(tmp_path, backend_port) as proxy:
            stream = await open_raw_session(proxy.port)
            async with stream:
                proxy.signal(signal.SIGTERM)
                start = trio.current_time()
                with trio.fail_after(EXIT_S):
                    assert await receive_close_code(stream) == 1001
                status = await proxy.wait_exit(SHUTDOWN_DEADLINE_S + 2)
                elapsed = trio.current_time() - start
            log = proxy.log()
            assert status == 0, log
            assert elapsed < SHUTDOWN_DEADLINE_S + 1, log
            assert "Traceback" not in log, log
