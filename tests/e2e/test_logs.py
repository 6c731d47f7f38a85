"""The log of a real ``wsproxy run`` process, read as a log shipper would.

Each format runs the real command with a real backend (``websockets``), a
session through it, a refused request and a backend that goes down; then every
line of stderr is parsed (logfmt with the parser of ``tests/test_log.py``,
JSON with ``json.loads``) and the types of the fields are checked. Under the
journal (``$JOURNAL_STREAM`` naming stderr's file), each line carries its
priority.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from textwrap import dedent

import pytest
import websockets.sync.client
import websockets.sync.server

from tests.test_log import parse_logfmt

ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def echo_backend() -> Iterator[tuple[websockets.sync.server.Server, int]]:
    def handler(ws: websockets.sync.server.ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    server = websockets.sync.server.serve(handler, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, int(server.socket.getsockname()[1])
    finally:
        server.shutdown()


def wait_for(predicate: object, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def run_proxy(tmp_path: Path, fmt: str, *, journal: bool = False) -> list[str]:
    """Run ``wsproxy run`` through a session, a refusal and a backend going down; its stderr lines."""
    port = free_port()
    log_path = tmp_path / f"{fmt}.log"
    with echo_backend() as (server, backend_port), open(log_path, "w") as log_file:
        config = tmp_path / "wsproxy.yaml"
        config.write_text(dedent(f"""\
            listeners: [{{name: public, bind: "127.0.0.1:{port}"}}]
            routes: [{{path: /, pool: echo}}]
            pools:
              echo:
                health: {{type: tcp, interval: 200ms, timeout: 200ms, rise: 1, fall: 1}}
                backends: [{{address: "127.0.0.1:{backend_port}"}}]
            shutdown: {{timeout: 2s, spread: 0s}}
            log: {{format: {fmt}}}
        """))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("JOURNAL_STREAM", None)
        if journal:
            stat = os.fstat(log_file.fileno())
            env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
        proc = subprocess.Popen([sys.executable, "-m", "wsproxy", "run", "-c", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            wait_for(lambda: any(m in log_path.read_text() for m in ("state=up", '"state": "up"')))
            with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
                ws.send("a message with spaces")
                assert ws.recv(timeout=10) == "a message with spaces"
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # not an upgrade: 426
                raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert raw.recv(100).startswith(b"HTTP/1.1 426")
            wait_for(lambda: any(m in log_path.read_text() for m in ("event=close", '"event": "close"')))
            server.shutdown()  # the backend goes down: a WARNING
            wait_for(lambda: any(m in log_path.read_text() for m in ("state=down", '"state": "down"')))
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return log_path.read_text().splitlines()


def by_event(entries: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """The first entry of each event (the ``health`` entry: the one that went down)."""
    found: dict[str, dict[str, object]] = {}
    for entry in entries:
        key = str(entry["event"])
        if key == "health" and entry["state"] != "down":
            continue
        found.setdefault(key, entry)
    return found


def test_text_is_logfmt_with_the_fields_an_operator_needs(tmp_path: Path) -> None:
    lines = run_proxy(tmp_path, "text")
    entries: list[dict[str, object]] = []
    for line in lines:
        pairs = parse_logfmt(line)  # raises on anything that is not logfmt
        assert {"ts", "level", "logger", "event"} <= set(pairs), line
        entries.append(dict(pairs))
    events = by_event(entries)
    start = events["starting"]
    assert start["version"] and start["python"] and start["pid"] == str(int(str(start["pid"])))
    assert start["config"] == str(tmp_path / "wsproxy.yaml") and start["workers"] == "1"
    assert start["listeners"].startswith("public=127.0.0.1:")  # type: ignore[union-attr]
    assert events["listening"]["tls"] == "false"
    close = events["close"]
    assert close["route"] == "*/" and close["by"] == "client" and close["client_code"] == "1000"
    assert float(str(close["dur_s"])) >= 0 and int(str(close["up_b"])) > 0
    refused = events["refused"]
    assert (refused["status"], refused["kind"], refused["level"]) == ("426", "upgrade", "info")
    assert str(refused["reason"]).startswith("not a WebSocket upgrade")  # spaces: quoted, read back whole
    assert (events["health"]["level"], events["health"]["state"]) == ("warning", "down")
    assert events["stopped"]["level"] == "info"


def test_json_has_typed_values(tmp_path: Path) -> None:
    lines = run_proxy(tmp_path, "json")
    entries = [json.loads(line) for line in lines]
    events = by_event(entries)
    start = events["starting"]
    assert type(start["pid"]) is int and start["workers"] == 1 and start["admin"] is None
    assert events["listening"]["tls"] is False
    close = events["close"]
    assert type(close["dur_s"]) is float and type(close["up_b"]) is int and close["client_code"] == 1000
    assert type(close["up_msgs"]) is int and close["identity"] == "-"
    refused = events["refused"]
    assert refused["status"] == 426 and refused["level"] == "info"
    assert events["health"]["level"] == "warning"


def test_under_the_journal_each_line_carries_its_priority(tmp_path: Path) -> None:
    lines = run_proxy(tmp_path, "text", journal=True)
    priorities = {"<6>": "info", "<4>": "warning", "<3>": "error", "<7>": "debug"}
    for line in lines:
        prefix, rest = line[:3], line[3:]
        assert prefix in priorities, line
        pairs = parse_logfmt(rest)
        assert pairs["level"] == priorities[prefix] and "ts" not in pairs, line
    assert any(line.startswith("<4>") and "state=down" in line for line in lines)
