"""End to end: the admin listener in front of a real ``App``, over loopback and a unix socket.

Every test runs a real ``wsproxy.app.App`` (``start_proxy``) in front of a real
trio-websocket echo backend, and ``serve_admin`` for that App in the test's
nursery. Requests are made by a small h11 client (keep-alive, one connection
per ``AdminClient``) or written by hand where the request must be malformed.
``/metrics`` is read back with prometheus_client's parser, as a scraper would.

What is covered: a live session shows in the metrics of its backend and
route, and its end in ``sessions_total``; ``/status``; drain and undrain
(percent-encoded and IPv6 addresses, idempotence, unknown pool or backend,
the log line); the bearer token; the unix socket (stale file replaced, mode
0660, removed on exit); 404 and 405 with ``Allow``; HEAD; keep-alive; and
that a malformed, oversized or slow request is answered or dropped without
stopping the listener. Against browsers (issue 15): a cross-origin POST is
403 and drains nothing, a rebinding Host is 421 on every path, a same-origin
POST works, a unix socket takes any Host; control characters in a path
segment are 400 and no value forges a log line (real text and JSON
formatters); failed authentication is logged without the token; a reload
swaps the token on open connections and moves the listener (in-process and on
a real ``wsproxy run`` with SIGHUP, a failed bind keeping the old listener);
``check`` and ``run`` refuse a non-loopback admin without a token. What the
numbers mean is tested purely in ``tests/control/test_metrics``, the Host and
Origin rules in ``tests/control/test_admin_policy``.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from tests.kit.admin import AdminClient, Reply, call
from tests.kit.process import make_config as process_config, pool, run_proxy, run_wsproxy
from tests.kit.servers import closed_port, make_config, start_proxy, start_ws_backend
from tests.kit.wait import until
from wsproxy.app import App
from wsproxy.config.schema import Address, AdminConfig
from wsproxy.control.admin import MAX_HEAD_BYTES, serve_admin
from wsproxy.log import TEXT_FORMAT, JsonFormatter, TextFormatter, parse_pairs

LOOPBACK = AdminConfig(bind=Address("127.0.0.1", 0))
TOKEN = b"s3cret-admin-token"


async def raw(address: str, data: bytes, *, read_timeout_s: float = 5.0) -> bytes:
    """Send ``data`` as it is and read until the server closes."""
    host, _, port = address.rpartition(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(data)
        chunks = []
        with trio.move_on_after(read_timeout_s):
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
        return b"".join(chunks)


# -- set-up ------------------------------------------------------------------------------------


@dataclass
class Stack:
    app: App
    proxy_port: int
    backend: str  # the echo backend, as the admin API names it: "127.0.0.1:PORT"
    admin: str  # where serve_admin listens


async def start_stack(nursery: trio.Nursery, admin: AdminConfig = LOOPBACK) -> Stack:
    backend_port = await start_ws_backend(nursery)
    app, proxy_port = await start_proxy(nursery, make_config([backend_port]))
    address = await nursery.start(partial(serve_admin, app, admin))
    return Stack(app, proxy_port, f"127.0.0.1:{backend_port}", address)


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(reply: Reply) -> Series:
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(reply.body.decode())
        for s in family.samples
    }


def total(series: Series, name: str, **labels: str) -> float:
    """The sum of the ``name`` series that carry (at least) ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in series.items() if n == name and wanted <= ls)


def backend_status(status: dict[str, object], pool: str, address: str) -> dict[str, object]:
    pools = status["pools"]
    assert isinstance(pools, dict)
    backends = pools[pool]["backends"]
    found = [b for b in backends if b["address"] == address]
    assert len(found) == 1, backends
    entry = found[0]
    assert isinstance(entry, dict)
    return entry


# -- /metrics and /status ----------------------------------------------------------------------


async def test_metrics_show_a_live_session_and_its_end(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        async with open_websocket_url(f"ws://127.0.0.1:{stack.proxy_port}/chat") as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            series = parse_metrics(await call(stack.admin, "GET", "/metrics"))
            backend = {"pool": "main", "backend": stack.backend}
            assert total(series, "wsproxy_backend_sessions_active", **backend) == 1
            assert total(series, "wsproxy_sessions_active") == 1  # by route
            assert total(series, "wsproxy_backend_bytes_total", direction="up", **backend) > 0  # live
            assert total(series, "wsproxy_backend_health", state="up", **backend) == 1
            assert total(series, "wsproxy_backend_draining", **backend) == 0
            assert total(series, "wsproxy_handshake_duration_seconds_count") == 1
            assert total(series, "wsproxy_config_generation") == 1
        await until(lambda: not stack.app.sessions)
        series = parse_metrics(await call(stack.admin, "GET", "/metrics"))
        assert total(series, "wsproxy_backend_sessions_active", **backend) == 0
        assert total(series, "wsproxy_sessions_active") == 0
        assert total(series, "wsproxy_sessions_closed_total", outcome="normal", **backend) == 1
        assert total(series, "wsproxy_messages_total", direction="up") == 1
        assert total(series, "wsproxy_messages_total", direction="down") == 1
        assert total(series, "wsproxy_backend_messages_total", direction="down", **backend) == 1
        assert total(series, "wsproxy_close_codes_total", sent_by="client", to="backend", code="1000") == 1
        assert total(series, "wsproxy_close_codes_total", sent_by="proxy") == 0  # it only relayed


async def test_bytes_and_messages_move_while_a_session_runs_and_stay_monotonic(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        seen: list[tuple[float, float]] = []

        async def scrape() -> None:
            series = parse_metrics(await call(stack.admin, "GET", "/metrics"))
            seen.append(
                (total(series, "wsproxy_messages_total", direction="up"), total(series, "wsproxy_bytes_total", direction="up"))
            )

        async with open_websocket_url(f"ws://127.0.0.1:{stack.proxy_port}/chat") as ws:
            for i in range(3):
                await ws.send_message(f"m{i}")
                assert await ws.get_message() == f"m{i}"
                await scrape()
        await until(lambda: not stack.app.sessions)
        await scrape()
    assert [m for m, _ in seen[:3]] == [1, 2, 3]  # counted while the session is open
    assert seen[3][0] == 3  # and once, not twice, when it has ended
    assert all(a[1] <= b[1] for a, b in zip(seen, seen[1:])), seen  # bytes never go backwards


async def test_status_lists_listeners_pools_and_backends(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        reply = await call(stack.admin, "GET", "/status")
        assert reply.status == 200
        status = reply.json()
        assert status["generation"] == 1
        assert status["listeners"], status
        entry = backend_status(status, "main", stack.backend)
        assert entry["draining"] is False
        assert entry["health"] == "up"
        assert entry["active"] == 0


async def test_head_answers_without_a_body_and_keep_alive_serves_several_requests(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        client = await AdminClient.connect(stack.admin)
        try:
            head = await client.request("HEAD", "/metrics")
            assert head.status == 200 and head.body == b""
            assert int(head.headers["content-length"]) > 0
            for _ in range(3):
                assert (await client.request("GET", "/status")).status == 200
            assert (await client.request("GET", "/nope")).status == 404
            assert (await client.request("GET", "/metrics")).status == 200
        finally:
            await client.aclose()


# -- drain / undrain ---------------------------------------------------------------------------


async def test_drain_and_undrain_a_backend(nursery: trio.Nursery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.control.admin")
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        encoded = stack.backend.replace(":", "%3A")
        drain = f"/pools/main/backends/{encoded}/drain"
        undrain = f"/pools/main/backends/{stack.backend}/undrain"  # a bare ":" is fine too

        reply = await call(stack.admin, "POST", drain)
        assert reply.status == 200
        assert reply.json() == {"pool": "main", "backend": stack.backend, "draining": True, "changed": True}
        status = (await call(stack.admin, "GET", "/status")).json()
        assert backend_status(status, "main", stack.backend)["draining"] is True
        series = parse_metrics(await call(stack.admin, "GET", "/metrics"))
        assert total(series, "wsproxy_backend_draining", pool="main", backend=stack.backend) == 1

        again = await call(stack.admin, "POST", drain)
        assert again.json() == {"pool": "main", "backend": stack.backend, "draining": True, "changed": False}

        reply = await call(stack.admin, "POST", undrain)
        assert reply.json() == {"pool": "main", "backend": stack.backend, "draining": False, "changed": True}
        status = (await call(stack.admin, "GET", "/status")).json()
        assert backend_status(status, "main", stack.backend)["draining"] is False
        again = await call(stack.admin, "POST", undrain)
        assert again.json()["changed"] is False

    actions = [r.getMessage() for r in caplog.records if r.name == "wsproxy.control.admin" and "event=admin" in r.getMessage()]
    assert len(actions) == 4, actions
    assert actions[0].startswith(f"event=admin action=drain pool=main backend={stack.backend} result=changed")
    assert all(r.levelno == logging.INFO for r in caplog.records if "event=admin" in r.getMessage())


async def test_drain_of_unknown_pool_or_backend_is_404(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        for target in (
            f"/pools/nope/backends/{stack.backend}/drain",
            "/pools/main/backends/127.0.0.1:1/drain",
            "/pools/main/backends/%5B%3A%3A1%5D%3A9001/undrain",  # [::1]:9001, decoded, not in the pool
        ):
            reply = await call(stack.admin, "POST", target)
            assert reply.status == 404, target
            assert reply.json()["error"] == "unknown pool or backend"
        assert reply.json()["backend"] == "[::1]:9001"
        status = (await call(stack.admin, "GET", "/status")).json()
        assert backend_status(status, "main", stack.backend)["draining"] is False


# -- routing errors, methods, limits -----------------------------------------------------------


async def test_unknown_paths_are_404_and_wrong_methods_405(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        for target in ("/index.html", "/metrics/x", "/pools/main/backends", "/pools/main/backends/a/b/drain",
                       f"/pools/main/backends/{stack.backend}/frobnicate"):  # fmt: skip
            assert (await call(stack.admin, "GET", target)).status == 404, target
        for method, target, allow in (
            ("POST", "/metrics", "GET, HEAD"),
            ("DELETE", "/status", "GET, HEAD"),
            ("GET", f"/pools/main/backends/{stack.backend}/drain", "POST"),
            ("PUT", f"/pools/main/backends/{stack.backend}/undrain", "POST"),
        ):
            reply = await call(stack.admin, method, target)
            assert (reply.status, reply.headers.get("allow")) == (405, allow), (method, target)
        status = (await call(stack.admin, "GET", "/status")).json()
        assert backend_status(status, "main", stack.backend)["draining"] is False  # the GET did nothing


async def test_malformed_requests_get_an_error_and_the_listener_keeps_serving(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        stack = await start_stack(nursery)
        for data, expected in (
            (b"GARBAGE\r\n\r\n", 400),
            (b"GET /status HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n", 400),
            (b"GET /status HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
            (b"GET /status HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n", 431),
        ):
            answer = await raw(stack.admin, data)
            assert answer.startswith(b"HTTP/1.1 %d " % expected), (data[:40], answer[:80])
            assert b"connection: close" in answer.lower()
            assert (await call(stack.admin, "GET", "/status")).status == 200

        # a POST body over the bound: 413, connection closed
        answer = await raw(
            stack.admin,
            b"POST /pools/main/backends/x/drain HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000,
        )
        assert answer.startswith(b"HTTP/1.1 413 ")
        # a small POST body is read and ignored
        client = await AdminClient.connect(stack.admin)
        try:
            reply = await client.request("POST", f"/pools/main/backends/{stack.backend}/drain", body=b'{"ignored": 1}')
            assert reply.json()["changed"] is True
            assert (await client.request("GET", "/status")).status == 200  # same connection, still in sync
        finally:
            await client.aclose()
        assert (await call(stack.admin, "GET", "/status")).status == 200


async def test_a_slow_request_is_dropped_after_10s(nursery: trio.Nursery, autojump_clock: trio.abc.Clock) -> None:
    stack = await start_stack(nursery)
    host, _, port = stack.admin.rpartition(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(b"GET /status HTTP/1.1\r\n")  # and never the rest
        started = trio.current_time()
        with trio.fail_after(60):
            assert await stream.receive_some(100) == b""
        assert 9.5 <= trio.current_time() - started <= 10.5
    assert (await call(stack.admin, "GET", "/status")).status == 200


# -- token -------------------------------------------------------------------------------------


async def test_a_token_is_required_when_configured(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        config = AdminConfig(bind=Address("127.0.0.1", 0), token_file="/run/admin.token", token=TOKEN + b"\n")
        stack = await start_stack(nursery, config)
        for target in ("/metrics", "/status", "/nope"):
            reply = await call(stack.admin, "GET", target)
            assert reply.status == 401, target
            assert reply.headers["www-authenticate"].startswith("Bearer")
        reply = await call(stack.admin, "POST", f"/pools/main/backends/{stack.backend}/drain", token=b"wrong")
        assert reply.status == 401
        assert 'error="invalid_token"' in reply.headers["www-authenticate"]
        status = (await call(stack.admin, "GET", "/status", token=TOKEN)).json()
        assert backend_status(status, "main", stack.backend)["draining"] is False  # the refused drain did nothing
        assert (await call(stack.admin, "GET", "/metrics", token=TOKEN)).status == 200
        reply = await call(stack.admin, "POST", f"/pools/main/backends/{stack.backend}/drain", token=TOKEN)
        assert reply.status == 200
        assert (await call(stack.admin, "GET", "/nope", token=TOKEN)).status == 404


# -- unix socket -------------------------------------------------------------------------------


async def test_unix_socket_replaces_a_stale_file_and_speaks_http(nursery: trio.Nursery, tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "admin.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket file nobody listens on, as a killed process leaves it
    stale.close()
    with trio.fail_after(10):
        scope = trio.CancelScope()
        done = trio.Event()

        async def run_admin(app: App, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await serve_admin(app, AdminConfig(unix_path=path), task_status=task_status)
            finally:
                done.set()

        backend_port = await start_ws_backend(nursery)
        app, _port = await start_proxy(nursery, make_config([backend_port]))
        address = await nursery.start(run_admin, app)
        assert address == f"unix:{path}"
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660

        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"content-type: application/json" in head.lower()
        status = json.loads(body)
        assert backend_status(status, "main", f"127.0.0.1:{backend_port}")["draining"] is False

        reply = await call(address, "POST", f"/pools/main/backends/127.0.0.1:{backend_port}/drain")
        assert reply.json()["draining"] is True

        # a second admin server on the same path while the first listens: refused, the file left alone
        with pytest.raises(OSError, match="another process is listening"):
            await serve_admin(app, AdminConfig(unix_path=path))
        assert stat.S_ISSOCK(os.stat(path).st_mode)

        scope.cancel()
        await done.wait()
        assert not os.path.exists(path)  # removed on exit


async def test_unix_path_that_is_not_a_socket_is_left_alone(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "admin.sock")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(OSError, match="not a socket"):
        await serve_admin(App(make_config([1])), AdminConfig(unix_path=path))
    with open(path) as f:
        assert f.read() == "precious"


# -- browsers: cross-origin requests and DNS rebinding (issue 15, item 1) -------------------------


def drained(stack: Stack) -> bool:
    draining = backend_status(stack.app.status(), "main", stack.backend)["draining"]
    assert isinstance(draining, bool)
    return draining


async def test_a_cross_origin_post_is_forbidden_and_nothing_drains(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.control.admin")
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        drain = f"/pools/main/backends/{stack.backend.replace(':', '%3A')}/drain"
        # curl -si -X POST -H 'Origin: http://evil.example' http://127.0.0.1:PORT/pools/main/backends/...%3A.../drain
        for headers in (
            [("Origin", "http://evil.example")],
            [("Origin", "null")],
            [("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Mode", "no-cors")],  # what Chromium sends for no-cors
            [("Origin", "http://evil.example"), ("Sec-Fetch-Site", "cross-site")],
        ):
            reply = await call(stack.admin, "POST", drain, headers=headers)
            assert reply.status == 403, headers
            assert reply.headers["content-type"].startswith("text/plain")
            assert reply.body.startswith(b"cross-origin request refused"), reply.body
            assert not drained(stack)
        assert (await call(stack.admin, "POST", drain.replace("/drain", "/undrain"), headers=headers)).status == 403
    refused = [r for r in caplog.records if "event=admin_refused" in r.getMessage()]
    assert len(refused) == 5 and all(r.levelno == logging.WARNING for r in refused)
    assert "status=403 method=POST path=/pools/main/backends/" in refused[0].getMessage()
    assert "origin=http://evil.example reason=\"cross-origin request refused" in refused[0].getMessage()
    assert not [r for r in caplog.records if "event=admin action=" in r.getMessage()]


async def test_a_same_origin_post_drains(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        port = stack.admin.rsplit(":", 1)[1]
        for origin, action in ((f"http://{stack.admin}", "drain"), (f"http://localhost:{port}", "undrain")):
            headers = [("Origin", origin), ("Sec-Fetch-Site", "same-origin"), ("Sec-Fetch-Mode", "cors")]
            reply = await call(stack.admin, "POST", f"/pools/main/backends/{stack.backend}/{action}", headers=headers)
            assert reply.status == 200, reply.body
            assert reply.json()["changed"] is True
            assert drained(stack) is (action == "drain")


async def test_a_rebinding_host_is_misdirected_on_every_path(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        port = stack.admin.rsplit(":", 1)[1]
        for target in ("/status", "/metrics", "/", "/static/status.js", f"/pools/main/backends/{stack.backend}/drain"):
            method = "POST" if target.endswith("/drain") else "GET"
            client = await AdminClient.connect(stack.admin)
            try:
                reply = await client.request(method, target, headers=[("Host", f"rebind.attacker.example:{port}")])
            finally:
                await client.aclose()
            assert reply.status == 421, target
            assert reply.headers["connection"] == "close"
            assert reply.body == (
                f"misdirected request: the Host is not this admin listener "
                f"(127.0.0.1:{port}, [::1]:{port}, localhost:{port})\n"
            ).encode()
            assert b"pools" not in reply.body and b"wsproxy_" not in reply.body
        assert not drained(stack)
        for host in (stack.admin, f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
            client = await AdminClient.connect(stack.admin)
            try:
                assert (await client.request("GET", "/status", headers=[("Host", host)])).status == 200, host
            finally:
                await client.aclose()


async def test_a_unix_socket_admin_takes_any_host_but_still_refuses_cross_origin_posts(
    nursery: trio.Nursery, tmp_path: object
) -> None:
    path = os.path.join(str(tmp_path), "admin.sock")
    with trio.fail_after(10):
        stack = await start_stack(nursery, AdminConfig(unix_path=path))
        for request in (
            b"GET /status HTTP/1.0\r\n\r\n",  # no Host at all
            b"GET /status HTTP/1.1\r\nHost: rebind.attacker.example:9090\r\nConnection: close\r\n\r\n",
        ):
            async with await trio.open_unix_socket(path) as stream:
                await stream.send_all(request)
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 200 "), data[:80]
        drain = f"/pools/main/backends/{stack.backend}/drain"
        reply = await call(stack.admin, "POST", drain, headers=[("Origin", "http://evil.example")])
        assert reply.status == 403
        assert not drained(stack)
        assert (await call(stack.admin, "POST", drain)).status == 200


# -- log injection (issue 15, item 7) --------------------------------------------------------------


@pytest.fixture
def formatted_log() -> Iterator[dict[str, io.StringIO]]:
    """What ``wsproxy.control.admin`` logs, written by the real text and JSON formatters."""
    streams = {"text": io.StringIO(), "json": io.StringIO()}
    handlers = [logging.StreamHandler(streams["text"]), logging.StreamHandler(streams["json"])]
    handlers[0].setFormatter(TextFormatter(TEXT_FORMAT))
    handlers[1].setFormatter(JsonFormatter())
    logger = logging.getLogger("wsproxy.control.admin")
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield streams
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)


async def test_control_characters_in_a_segment_are_400_and_no_log_line_is_forged(
    nursery: trio.Nursery, formatted_log: dict[str, io.StringIO]
) -> None:
    forged = "level=info logger=wsproxy.app event=reloaded generation=99"
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        for escape in ("%0A", "%0D%0A", "%00", "%1B", "%7F"):
            segment = f"main{escape}{forged.replace(' ', '%20').replace('=', '%3D')}"
            reply = await call(stack.admin, "POST", f"/pools/{segment}/backends/{stack.backend}/drain")
            assert (reply.status, reply.body) == (400, b"control character in the request path\n"), escape
        # no control character: a legal (unknown) name, logged as one quoted value
        for segment in ("%20event%3Dforged", "x%20level%3Ddebug%20ts%3D0", "%27%22"):
            reply = await call(stack.admin, "POST", f"/pools/{segment}/backends/{stack.backend}/drain")
            assert reply.status == 404
        assert not drained(stack)
    text_lines = [line for line in formatted_log["text"].getvalue().splitlines() if "event=listening" not in line]
    assert len(text_lines) == 8, text_lines
    assert all(re.match(r"ts=\S+ level=(info|warning) logger=wsproxy\.control\.admin event=admin", line)
               for line in text_lines), text_lines
    assert all("generation" not in parse_pairs(line) for line in text_lines), text_lines
    entries = [json.loads(line) for line in formatted_log["json"].getvalue().splitlines()]
    entries = [entry for entry in entries if entry["event"] != "listening"]
    assert len(entries) == 8, entries
    for entry in entries:
        assert entry["event"] in ("admin", "admin_refused") and entry["logger"] == "wsproxy.control.admin"
        assert entry["level"] in ("info", "warning") and "generation" not in entry
    assert [e["pool"] for e in entries if e["event"] == "admin"] == [" event=forged", "x level=debug ts=0", "'\""]
    assert entries[0]["path"].startswith("/pools/main%0A")  # the refused path as sent, still percent-encoded


async def test_a_failed_authentication_is_logged_with_peer_and_path_never_the_token(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.control.admin")
    with trio.fail_after(10):
        stack = await start_stack(nursery, AdminConfig(bind=Address("127.0.0.1", 0), token_file="/t", token=TOKEN))
        assert (await call(stack.admin, "GET", "/status?x=1")).status == 401
        wrong = b"wrong-" + TOKEN
        assert (await call(stack.admin, "POST", f"/pools/main/backends/{stack.backend}/drain", token=wrong)).status == 401
        assert (await call(stack.admin, "GET", "/status", token=TOKEN)).status == 200
    refused = [r for r in caplog.records if "event=admin_refused" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.WARNING, logging.WARNING]
    first, second = (r.getMessage() for r in refused)
    assert re.search(r"peer=127\.0\.0\.1:\d+ status=401 method=GET path=/status host=", first), first
    assert "reason=\"no bearer token\"" in first and "x=1" not in first
    assert f"status=401 method=POST path=/pools/main/backends/{stack.backend}/drain" in second
    assert "reason=\"invalid bearer token\"" in second
    assert not [r for r in caplog.records if TOKEN.decode() in r.getMessage()]


# -- reload applies the admin section (issue 15, item 6) ---------------------------------------------


async def test_a_reload_swaps_the_token_in_place_and_moves_the_listener(nursery: trio.Nursery) -> None:
    from wsproxy.control.admin import AdminServer

    new_token = b"n3w-admin-token-0123"
    with trio.fail_after(15):
        backend_port = await start_ws_backend(nursery)
        app, _port = await start_proxy(nursery, make_config([backend_port]))
        server = AdminServer(app)
        first = await nursery.start(server.serve, AdminConfig(bind=Address("127.0.0.1", 0), token_file="/t", token=TOKEN))
        kept = await AdminClient.connect(first)  # a keep-alive connection opened before the reload
        try:
            bearer = [("Authorization", f"Bearer {TOKEN.decode()}")]
            assert (await kept.request("GET", "/status", headers=bearer)).status == 200

            # the token file changed, the bind did not: same listener, new token at once, on open connections too
            server.commit(server.prepare(AdminConfig(bind=Address("127.0.0.1", 0), token_file="/t", token=new_token)))
            assert server.address == first
            assert (await kept.request("GET", "/status", headers=bearer)).status == 401
            new_bearer = [("Authorization", f"Bearer {new_token.decode()}")]
            assert (await kept.request("GET", "/status", headers=new_bearer)).status == 200

            # a bind that cannot be had: OSError from prepare, nothing changed
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = Address("127.0.0.1", taken.getsockname()[1])
                with pytest.raises(OSError):
                    server.prepare(AdminConfig(bind=busy, token_file="/t", token=b"another-token-0123456"))
            assert server.address == first and server.token == new_token
            assert (await call(first, "GET", "/status", token=new_token)).status == 200

            # a new bind: the new listener answers, the old one stops accepting; its open connection finishes
            moved = Address("127.0.0.1", closed_port())
            server.commit(server.prepare(AdminConfig(bind=moved, token_file="/t", token=new_token)))
            assert server.address == str(moved)
            assert (await call(str(moved), "GET", "/status", token=new_token)).status == 200
            with trio.fail_after(2):
                while True:
                    try:
                        await (await AdminClient.connect(first)).aclose()
                    except OSError:
                        break  # refused: nothing listens on the old address any more
                    await trio.sleep(0.01)
            assert (await kept.request("GET", "/status", headers=new_bearer)).status == 200

            # the admin section removed: nothing listens
            server.commit(server.prepare(None))
            assert server.address is None
            with pytest.raises(OSError):
                await AdminClient.connect(str(moved))
        finally:
            await kept.aclose()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def test_sighup_rotates_the_token_and_moves_the_listener_of_a_real_process(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    token_path = tmp_path / "admin.token"
    old, new = b"old-admin-token-0123456", b"new-admin-token-6543210"
    token_path.write_bytes(old + b"\n")
    backend_port = await start_ws_backend(nursery)
    port, admin_port, moved_port = closed_port(), closed_port(), closed_port()

    def config(admin_port: int) -> dict[str, object]:
        return process_config(
            listeners={"public": port}, pools={"main": pool(backend_port)}, routes=[("/", "main")], admin_port=0,
            admin={"bind": f"127.0.0.1:{admin_port}", "token_file": str(token_path)},
        )

    async with run_proxy(tmp_path, config(admin_port), ports=[port]) as proxy:
        with trio.fail_after(30):
            first = f"127.0.0.1:{admin_port}"
            assert (await call(first, "GET", "/status", token=old)).status == 200

            _write(token_path, new.decode() + "\n")
            log = await proxy.reload()
            assert "event=reloaded " in log, log
            assert (await call(first, "GET", "/status", token=old)).status == 401  # right after event=reloaded
            assert (await call(first, "GET", "/status", token=new)).status == 200
            assert re.search(r"event=admin_reloaded changed=token address=127\.0\.0\.1:\d+ was=- auth=token", log), log

            log = await proxy.reload(config(moved_port))
            second = f"127.0.0.1:{moved_port}"
            assert f"event=admin_reloaded changed=bind address={second} was={first} auth=token" in log, log
            assert (await call(second, "GET", "/status", token=new)).status == 200
            with trio.fail_after(2):
                while True:
                    try:
                        await (await AdminClient.connect(first)).aclose()
                    except OSError:
                        break
                    await trio.sleep(0.01)

            # a bind that fails is a reload error: the old listener (and the old config) keep serving
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                log = await proxy.reload(config(taken.getsockname()[1]))
                assert "event=reload_failed" in log and "action=kept_old_config" in log, log
                assert f"admin.bind: cannot listen on 127.0.0.1:{taken.getsockname()[1]}: Address already in use" in log
                assert (await call(second, "GET", "/status", token=new)).status == 200
            proxy.assert_running()
            assert old.decode() not in proxy.log() and new.decode() not in proxy.log()
            assert "Traceback" not in proxy.log()


# -- a non-loopback admin needs a token (issue 15, item 1) ---------------------------------------------


def _loopback_only_name() -> str | None:
    """A host name other than ``localhost`` that resolves to loopback addresses only, if this machine has one."""
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, 0, type=socket.SOCK_STREAM)}
    except OSError:
        return None
    return name if addresses and all(ipaddress.ip_address(a).is_loopback for a in addresses) else None


def _admin_yaml(tmp_path: Path, admin: str, port: int = 8080) -> Path:
    path = tmp_path / "wsproxy.yaml"
    path.write_text(
        f"listeners: [{{name: public, bind: '127.0.0.1:{port}'}}]\n"
        "routes: [{pool: echo}]\n"
        "pools: {echo: {backends: [{address: '127.0.0.1:9001'}]}}\n"
        "shutdown: {timeout: 2s, spread: 0s}\n"
        f"admin: {admin}\n"
    )
    return path


async def wsproxy(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process([sys.executable, "-m", "wsproxy", *args], capture_stdout=True, capture_stderr=True, check=False)


async def test_check_and_run_refuse_a_non_loopback_bind_without_a_token(tmp_path: Path) -> None:
    path = _admin_yaml(tmp_path, "{bind: '0.0.0.0:9090'}", port=closed_port())
    for command in ("check", "run"):
        done = await wsproxy(command, "-c", str(path))
        output = done.stderr.decode()
        assert done.returncode == 1, output
        assert f"{path}:5:15: admin.bind: 0.0.0.0:9090 is not a loopback address" in output, output
        assert "insecure_no_token: true" in output
    path = _admin_yaml(tmp_path, "{bind: '0.0.0.0:9090', insecure_no_token: true}")
    done = await wsproxy("check", "-c", str(path))
    assert done.returncode == 0, done.stderr.decode()


async def test_an_insecure_admin_starts_with_a_warning(tmp_path: Path) -> None:
    name = _loopback_only_name()
    if name is None:  # binding 0.0.0.0 would leave loopback, which the tests never do
        pytest.skip("no host name of this machine resolves to loopback only")
    port, admin_port = closed_port(), closed_port()
    path = _admin_yaml(tmp_path, f"{{bind: '{name}:{admin_port}', insecure_no_token: true}}", port=port)
    async with run_wsproxy(path, stop_timeout_s=10) as proxy:
        with trio.fail_after(15):
            await proxy.wait_log("event=admin_listening")
            log = proxy.log()
            assert re.search(r"level=warning logger=wsproxy\.control\.admin event=admin_insecure address=\S+ reason=\"insecure_no_token", log), log
            address = f"127.0.0.1:{admin_port}"
            assert (await call(address, "GET", "/status")).status == 200
            reply = await call(address, "GET", "/status", headers=[("Host", f"{name}:{admin_port}")])
            assert reply.status == 200  # the name bind gave is this listener's
