"""End to end: ``/metrics`` of a real ``wsproxy run`` process, read as Prometheus would.

One ``wsproxy run`` subprocess (its own interpreter, its own fds, real
signals) in front of real backends in the test process: a trio-websocket
echo backend, one that answers the upgrade with 403, one that never answers,
a port with nothing listening, and an auth service that is not there. The
test drives every kind of refusal the proxy can make at a real client
connection (a bad PROXY header, a per-address limit, a client that says
nothing, a partial request, a request that is not an upgrade, no route, a
foreign Origin, no credentials, a missing auth service, a full pool, a dead,
a silent and a refusing backend), then compares the ``event=refused`` lines
of the process's log with ``wsproxy_refused_total``: one count per line,
with the same route, reason and status. A refusal that is logged but not
counted (or counted twice) fails it. What is left out: the accept loop's
shedding while out of descriptors (no log line per connection; it is
counted by ``App`` and driven in ``tests/e2e/test_overload``) and a local
overload on connect, which needs an exhausted fd table.

The scrapes are parsed with prometheus_client's parsers, the text format's
and OpenMetrics' (asked for with ``Accept``); the process and build families,
the upstream histograms, close codes, the loop lag and the removal of a
backend's series by a reload (SIGHUP) are checked on the same process.
"""

from __future__ import annotations

import collections
import hashlib
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import open_websocket_url

from tests.kit.process import WsproxyProcess, run_wsproxy
from tests.kit.servers import closed_port, raw_request, start_tcp_backend, start_ws_backend, status_of
from tests.kit.wait import SLACK_S
from tests.kit.ws import UPGRADE_REQUEST
from wsproxy import __version__

#: timeouts.handshake in config_text: a partial request gets 408 and a silent client is closed after it.
HANDSHAKE_S = 1.0
TOKEN = "right-token"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Proxy(WsproxyProcess):
    """The kit's ``wsproxy run`` with its ports by listener name (and "admin")."""

    ports: dict[str, int] = {}

    async def get(self, path: str, accept: str | None = None) -> tuple[dict[str, str], bytes]:
        admin = self.ports["admin"]
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\nConnection: close\r\n"
        if accept:
            head += f"Accept: {accept}\r\n"
        reply = await raw_request(admin, (head + "\r\n").encode())
        header_block, _, body = reply.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 200"), reply[:300]
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        return headers, body

    async def scrape(self, accept: str | None = None) -> tuple[dict[str, str], Samples]:
        """(family → type, samples); parsed as the answer's content type says."""
        headers, body = await self.get("/metrics", accept)
        if headers["content-type"].startswith("application/openmetrics-text"):
            families = list(openmetrics_families(body.decode()))
        else:
            assert headers["content-type"].startswith("text/plain; version=0.0.4")
            families = list(text_string_to_metric_families(body.decode()))
        types = {f.name: f.type for f in families}
        samples = {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}
        return types, samples

    async def wait_for(self, text: str, count: int = 1) -> None:
        await self.wait_log(text, count=count, timeout_s=10)


def total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def config_text(ports: dict[str, int], backends: dict[str, int], *, dead_port: int) -> str:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    return f"""\
listeners:
  - name: public
    bind: 127.0.0.1:{ports["public"]}
  - name: behind_lb
    bind: 127.0.0.1:{ports["pp"]}
    proxy_protocol: v1
routes:
  - path: /chat
    pool: echo
  - path: /origin
    pool: echo
    origins: ["https://ok.test"]
  - path: /auth
    pool: echo
    auth:
      tokens: [{{name: t, sha256: "{digest}"}}]
  - path: /fwd
    pool: echo
    auth:
      forward: {{url: "http://127.0.0.1:{backends["no_auth_service"]}/auth", timeout: 1s}}
  - path: /full
    pool: full
  - path: /dead
    pool: dead
  - path: /silent
    pool: silent
  - path: /refusing
    pool: refusing
pools:
  echo:
    backends: [{{address: "127.0.0.1:{backends["echo"]}"}}]
  full:
    backends: [{{address: "127.0.0.1:{backends["full"]}", max_connections: 1}}]
  dead:
    retries: 0
    backends: [{{address: "127.0.0.1:{dead_port}"}}]
  silent:
    retries: 0
    backends: [{{address: "127.0.0.1:{backends["silent"]}"}}]
  refusing:
    retries: 0
    backends: [{{address: "127.0.0.1:{backends["refusing"]}"}}]
timeouts:
  handshake: 1s
  upstream_handshake: 1s
limits:
  max_connections_per_ip: 3
admin:
  bind: 127.0.0.1:{ports["admin"]}
shutdown: {{timeout: 2s, spread: 0s}}
"""


@asynccontextmanager
async def wsproxy_run(tmp_path: Path, backends: dict[str, int]) -> AsyncIterator[Proxy]:
    ports = {name: closed_port() for name in ("public", "pp", "admin")}
    config_path = tmp_path / "wsproxy.yaml"
    config_path.write_text(config_text(ports, backends, dead_port=closed_port()))
    async with run_wsproxy(config_path, kind=Proxy, stop_timeout_s=6) as proxy:
        proxy.ports = ports
        await proxy.wait_log("event=listening listener=behind_lb", timeout_s=20)
        yield proxy


async def refusing_backend(stream: trio.SocketStream) -> None:
    """Reads the upgrade request and answers it with 403 (the proxy relays it)."""
    data = b""
    with trio.move_on_after(5):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\nConnection: close\r\n\r\nno\n")
    await stream.aclose()


async def silent_backend(stream: trio.SocketStream) -> None:
    """Accepts and never answers the upgrade."""
    with trio.move_on_after(30):
        while await stream.receive_some(65536):
            pass


def upgrade(path: str, *extra: str) -> bytes:
    head = UPGRADE_REQUEST.replace(b"GET /chat ", f"GET {path} ".encode())
    return head[:-2] + b"".join(f"{line}\r\n".encode() for line in extra) + b"\r\n"


REFUSED = re.compile(r"event=refused .*?route=(\S+) kind=(\S+) (?:\S+=\S+ )*?status=(\S+) reason=")


async def test_every_refusal_is_logged_once_and_counted_once(nursery: trio.Nursery, tmp_path: Path) -> None:
    backends = {
        "echo": await start_ws_backend(nursery),
        "full": await start_ws_backend(nursery),
        "refusing": await start_tcp_backend(nursery, refusing_backend),
        "silent": await start_tcp_backend(nursery, silent_backend),
        "no_auth_service": closed_port(),
    }
    with trio.fail_after(60):
        async with wsproxy_run(tmp_path, backends) as proxy:
            port = proxy.ports["public"]
            expected: list[tuple[str, str, str]] = []

            async def expect(request: bytes, status: int, route: str, reason: str) -> None:
                assert status_of(await raw_request(port, request)) == status, (route, reason)
                expected.append((route, reason, str(status)))

            await expect(b"GET /chat HTTP/1.1\r\nHost: x\r\n\r\n", 426, "-", "upgrade")
            await expect(b"GET /chat HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "-", "upgrade")
            await expect(upgrade("/nowhere"), 404, "-", "no_route")
            await expect(upgrade("/origin", "Origin: https://evil.test"), 403, "*/origin", "origin")
            await expect(upgrade("/auth"), 401, "*/auth", "auth")
            await expect(upgrade("/fwd"), 503, "*/fwd", "auth_unavailable")
            await expect(upgrade("/dead"), 502, "*/dead", "upstream_failed")
            await expect(upgrade("/silent"), 504, "*/silent", "upstream_timeout")
            await expect(upgrade("/refusing"), 403, "*/refusing", "backend_refused")
            async with open_websocket_url(f"ws://127.0.0.1:{port}/full") as ws:  # takes the full pool's one slot
                await ws.send_message("hi")
                assert await ws.get_message() == "hi"
                await expect(upgrade("/full"), 503, "*/full", "no_backend")
            # A partial request gets 408 when timeouts.handshake ends; a silent client is closed without a word.
            assert status_of(await raw_request(port, b"GET /chat HTTP/1.1\r\n", read_timeout_s=HANDSHAKE_S + SLACK_S)) == 408
            expected.append(("-", "timeout", "408"))
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            with trio.fail_after(HANDSHAKE_S + SLACK_S):
                assert await silent.receive_some(1) == b""  # closed by the proxy
            await silent.aclose()
            expected.append(("-", "timeout", "none"))
            # Garbage where a PROXY header must be: closed without an answer.
            assert await raw_request(proxy.ports["pp"], b"GET / HTTP/1.1\r\n\r\n") == b""
            expected.append(("-", "proxy_header", "none"))
            # max_connections_per_ip: 3 held connections (the WebSocket one has ended), the 4th is 429.
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            await trio.sleep(0.5)  # let the proxy accept them
            await expect(upgrade("/chat"), 429, "-", "limit")
            for stream in held:
                await stream.aclose()  # they leave before the deadline: not refusals, the client went away

            await proxy.wait_for("event=refused", len(expected))
            await proxy.wait_for("event=close ")  # the /full session
            _, samples = await proxy.scrape()
            counted = {
                (dict(labels)["route"], dict(labels)["reason"], dict(labels)["status"]): v
                for (name, labels), v in samples.items() if name == "wsproxy_refused_total"
            }  # fmt: skip
            logged = collections.Counter(
                (m.group(1), m.group(2), "none" if m.group(3) == "null" else m.group(3))
                for m in map(REFUSED.search, proxy.log().splitlines()) if m
            )  # fmt: skip
            lines = [line for line in proxy.log().splitlines() if "event=refused" in line]
            assert sum(logged.values()) == len(lines), "an event=refused line without route, kind and status"
            assert counted == dict(logged), f"counted {counted}\nlogged {dict(logged)}"
            assert logged == collections.Counter(expected), lines
            status = await proxy.get("/status")
            assert b'"refused": %d' % len(expected) in status[1]


async def test_a_scrape_of_a_real_process(nursery: trio.Nursery, tmp_path: Path) -> None:
    backends = {
        "echo": await start_ws_backend(nursery),
        "full": await start_ws_backend(nursery),
        "refusing": await start_tcp_backend(nursery, refusing_backend),
        "silent": await start_tcp_backend(nursery, silent_backend),
        "no_auth_service": closed_port(),
    }
    echo = f"127.0.0.1:{backends['echo']}"
    with trio.fail_after(60):
        async with wsproxy_run(tmp_path, backends) as proxy:
            async with open_websocket_url(f"ws://127.0.0.1:{proxy.ports['public']}/chat") as ws:
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
                types, samples = await proxy.scrape()
                assert total(samples, "wsproxy_sessions_active", route="*/chat") == 1
                assert total(samples, "wsproxy_backend_messages_total", pool="echo", backend=echo, direction="up") == 1
            await proxy.wait_for("event=close ")
            await trio.sleep(0.6)  # two wake-ups of the loop-lag probe at least
            types, samples = await proxy.scrape()
            for name, type_ in (("process_open_fds", "gauge"), ("process_max_fds", "gauge"),
                                ("process_resident_memory_bytes", "gauge"), ("process_cpu_seconds", "counter"),
                                ("process_start_time_seconds", "gauge"), ("wsproxy_upstream_connect_seconds", "histogram"),
                                ("wsproxy_upstream_handshake_seconds", "histogram"), ("wsproxy_event_loop_lag_seconds", "gauge"),
                                ("wsproxy_refused", "counter"), ("wsproxy_certificate_expiry_timestamp_seconds", "gauge")):  # fmt: skip
                assert types.get(name) == type_, name
            assert 10 < total(samples, "process_open_fds") < total(samples, "process_max_fds")
            assert total(samples, "process_resident_memory_bytes") > 10_000_000
            builds = [dict(ls) for (n, ls), _ in samples.items() if n == "wsproxy_build_info"]
            assert builds == [{"version": __version__, "python_version": sys.version.split()[0]}]
            backend = {"pool": "echo", "backend": echo}
            assert total(samples, "wsproxy_upstream_connect_seconds_count", **backend) == 1
            assert total(samples, "wsproxy_upstream_handshake_seconds_count", **backend) == 1
            assert 0 < total(samples, "wsproxy_upstream_handshake_seconds_sum", **backend) < 2.0  # seconds: far above any healthy loopback handshake
            assert total(samples, "wsproxy_sessions_closed_total", route="*/chat", outcome="normal", **backend) == 1
            assert total(samples, "wsproxy_close_codes_total", sent_by="client", to="backend", code="1000") == 1
            assert total(samples, "wsproxy_close_codes_total", sent_by="proxy") == 0
            assert total(samples, "wsproxy_event_loop_delay_seconds_count") >= 2
            assert 0 <= total(samples, "wsproxy_event_loop_lag_seconds") < 2.0  # seconds: far above any healthy lag
            assert total(samples, "wsproxy_backend_bytes_total", direction="up", **backend) > 0
            # OpenMetrics, when asked for
            types, om = await proxy.scrape("application/openmetrics-text; version=1.0.0,text/plain;q=0.5")
            assert types["wsproxy_build"] == "info" and types["wsproxy_sessions_closed"] == "counter"
            assert total(om, "wsproxy_sessions_closed_total", outcome="normal", **backend) == 1
            # A reload that takes the dead pool's backend away: its series go, the new one's come.
            text = proxy.config_path.read_text()
            old = re.search(r"dead:\n    retries: 0\n    backends: \[\{address: \"(127\.0\.0\.1:\d+)\"", text)
            assert old is not None
            new = f"127.0.0.1:{closed_port()}"
            proxy.config_path.write_text(text.replace(old.group(1), new))
            proxy.proc.send_signal(signal.SIGHUP)
            await proxy.wait_for("event=reloaded")
            _, samples = await proxy.scrape()
            assert not [key for key in samples if ("backend", old.group(1)) in key[1]]
            assert total(samples, "wsproxy_backend_health", pool="dead", backend=new) == 1  # one state of three
            assert total(samples, "wsproxy_reloads_total") == 1


# -- the scrape is encoded off the event loop (issue 14: scrape cost) -------------------------------


async def test_metrics_are_encoded_in_a_worker_thread_from_a_snapshot_taken_on_the_loop(nursery: trio.Nursery) -> None:
    """GET /metrics reads the proxy's state on the loop and encodes it in another thread; same series as render."""
    import threading

    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.parser import text_string_to_metric_families

    from tests.e2e.test_admin import call
    from tests.support import make_config, start_proxy, start_ws_backend
    from wsproxy.config.schema import Address, AdminConfig
    from wsproxy.control.admin import serve_admin

    class WhereCollected:
        """A real collector among the process ones, noting the thread that collects it."""

        def __init__(self) -> None:
            self.threads: list[int] = []

        def collect(self) -> list[GaugeMetricFamily]:
            self.threads.append(threading.get_ident())
            family = GaugeMetricFamily("test_where", "the collecting thread")
            family.add_metric([], 1)
            return [family]

    with trio.fail_after(20):
        port = await start_ws_backend(nursery)
        app, _ = await start_proxy(nursery, make_config([port]))
        where = WhereCollected()
        app._metrics_registry.process_collectors.append(where)  # type: ignore[attr-defined]
        app._metrics_registry.register(where)  # type: ignore[attr-defined]  # for render(), the synchronous path
        admin = await nursery.start(serve_admin, app, AdminConfig(bind=Address("127.0.0.1", 0)))
        reply = await call(admin, "GET", "/metrics")
        assert reply.status == 200
        assert where.threads and threading.get_ident() not in where.threads
        scraped = {f.name for f in text_string_to_metric_families(reply.body.decode())}
        where.threads.clear()
        direct = {f.name for f in text_string_to_metric_families(app.render_metrics()[1].decode())}
        assert where.threads == [threading.get_ident()]  # render() itself stays synchronous
        assert scraped == direct and {"test_where", "wsproxy_backend_health", "process_open_fds"} <= scraped
        reply = await call(admin, "GET", "/metrics", headers=[("Accept", "application/openmetrics-text; version=1.0.0")])
        assert reply.headers["content-type"].startswith("application/openmetrics-text")
        assert reply.body.endswith(b"# EOF\n")
