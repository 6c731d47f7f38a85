"""End to end: TLS session resumption on the listeners (issue 17 item 5).

Clients are Python's ``ssl`` module in a thread (``session=`` and
``session_reused`` are what a reconnecting client uses), against the proxy
in-process (``App.serve``, configs loaded from YAML so the loader builds the
contexts) and as a real ``wsproxy run`` process that receives SIGHUP. What is
checked: TLS 1.3 and TLS 1.2 sessions resume; they still resume after a reload
that rebuilt every ``SSLContext`` (also one that renewed the certificate), but
not after one that changed the client-certificate policy; keys rotate after
``session_ticket_lifetime``; ``session_ticket_lifetime: 0`` turns resumption
off; the TLS 1.3 tickets come with the first answer, never while the client
may still be writing its request (the reason tickets were off before); and a
libssl that cannot be reached logs one fallback line and keeps serving.
"""

from __future__ import annotations

import select
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from tests.kit.process import write_config
from tests.kit.servers import simple_config, start_ws_backend
from tests.kit.tls import Pki, make_pki, pki, q, tls_block, write_leaf  # noqa: F401 (pki is a fixture)
from tests.kit.ws import UPGRADE_REQUEST
from wsproxy.app import App
from wsproxy.edge.contexts import listener_context, load_checked
from wsproxy.edge.tickets import SessionTickets, TicketKeysUnavailable


@dataclass
class Visit:
    status_line: bytes
    reused: bool
    session: ssl.SSLSession | None
    early_bytes: int  # bytes the server sent after the handshake, before the request


def visit_sync(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None, *, watch_s: float = 0.0) -> Visit:
    """Handshake (resuming ``session`` if given), optionally wait ``watch_s`` for unsolicited bytes, upgrade."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            early = 0
            if watch_s:
                readable, _, _ = select.select([tls], [], [], watch_s)
                if readable:  # what came, still encrypted (peeked through a duplicate descriptor)
                    with socket.fromfd(tls.fileno(), socket.AF_INET, socket.SOCK_STREAM) as dup:
                        early = len(dup.recv(65536, socket.MSG_PEEK))
            tls.sendall(UPGRADE_REQUEST)
            head = b""
            while b"\r\n\r\n" not in head:
                data = tls.recv(65536)
                assert data, head
                head += data
            return Visit(head.split(b"\r\n", 1)[0], tls.session_reused, tls.session, early)


def client_ctx(pki: Pki, version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = pki.client_context()
    ctx.minimum_version = ctx.maximum_version = version
    return ctx


async def visit(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None, **kw: float) -> Visit:
    return await trio.to_thread.run_sync(lambda: visit_sync(port, ctx, session, **kw))


def tls_config(tmp_path: Path, pki: Pki, backend: int, *extra: str) -> Path:
    return write_config(tmp_path, simple_config([backend], listener=tls_block(pki, *extra)))


async def start(nursery: trio.Nursery, path: Path, tickets: SessionTickets | None = None) -> tuple[App, int]:
    app = App(load_checked(str(path)))
    if tickets is not None:
        app.tickets = tickets
    addresses = await nursery.start(app.serve)
    return app, addresses["public"][0][1]


VERSIONS = [pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"), pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2")]


@pytest.mark.parametrize("version", VERSIONS)
async def test_sessions_resume_before_and_after_a_reload_that_renews_the_certificate(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, version: ssl.TLSVersion
) -> None:
    with trio.fail_after(20):
        backend = await start_ws_backend(nursery)
        path = tls_config(tmp_path, pki, backend)
        app, port = await start(nursery, path)
        ctx = client_ctx(pki, version)
        first = await visit(port, ctx)
        assert first.status_line == b"HTTP/1.1 101 Switching Protocols" and not first.reused
        assert first.session is not None and first.session.has_ticket
        again = await visit(port, ctx, first.session)
        assert again.reused and again.status_line.startswith(b"HTTP/1.1 101")

        # a reload that renews the certificate: new files, a new SSLContext
        write_leaf(pki.ca.issue_cert("localhost", "127.0.0.1"), tmp_path, "server")
        old_tls = app.generation.config.listeners[0].tls
        assert old_tls is not None
        old_context = listener_context(old_tls)
        app.reload(load_checked(str(path)))
        new_tls = app.generation.config.listeners[0].tls
        assert new_tls == old_tls and new_tls is not None  # the same settings and paths...
        assert listener_context(new_tls) is not old_context  # ...read again: the renewed certificate is served
        after = await visit(port, ctx, again.session or first.session)
        assert after.reused, "a reload invalidated the tickets"
        assert app.tickets.fallback_reason is None


async def test_a_changed_client_certificate_policy_starts_new_keys(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    with trio.fail_after(20):
        backend = await start_ws_backend(nursery)
        clients = make_pki(tmp_path, "clients")
        path = tls_config(tmp_path, pki, backend)
        app, port = await start(nursery, path)
        ctx = client_ctx(pki, ssl.TLSVersion.TLSv1_3)
        first = await visit(port, ctx)
        write_config(
            tmp_path,
            simple_config([backend], listener=tls_block(pki, f"  client_ca: {q(clients.ca_pem)}", "  client_cert: optional")),
        )
        app.reload(load_checked(str(path)))
        after = await visit(port, ctx, first.session)
        assert after.status_line.startswith(b"HTTP/1.1 101") and not after.reused


async def test_ticket_keys_rotate_after_the_lifetime(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    now = [1000.0]
    tickets = SessionTickets(clock=lambda: now[0])
    with trio.fail_after(20):
        backend = await start_ws_backend(nursery)
        path = tls_config(tmp_path, pki, backend, "  session_ticket_lifetime: 1h")
        _app, port = await start(nursery, path, tickets)
        ctx = client_ctx(pki, ssl.TLSVersion.TLSv1_3)
        first = await visit(port, ctx)
        now[0] += 3599.0
        assert (await visit(port, ctx, first.session)).reused  # the key is still current
        now[0] += 2.0  # past the lifetime: the next accept rotates the key
        rotated = await visit(port, ctx, first.session)
        assert not rotated.reused and rotated.session is not None and rotated.session.has_ticket
        assert (await visit(port, ctx, rotated.session)).reused  # the new key's tickets resume


async def test_lifetime_zero_turns_resumption_off(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    with trio.fail_after(20):
        backend = await start_ws_backend(nursery)
        _app, port = await start(nursery, tls_config(tmp_path, pki, backend, "  session_ticket_lifetime: 0"))
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            ctx = client_ctx(pki, version)
            first = await visit(port, ctx)
            assert first.session is not None and not first.session.has_ticket
            if version is ssl.TLSVersion.TLSv1_3:  # no ticket, nothing to resume with
                continue
            assert not (await visit(port, ctx, first.session)).reused


async def test_tls_1_3_tickets_come_with_the_first_answer_not_before_the_request(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki
) -> None:
    """The client may be writing its request then; Python clients that read in another thread race in OpenSSL."""
    with trio.fail_after(20):
        backend = await start_ws_backend(nursery)
        _app, port = await start(nursery, tls_config(tmp_path, pki, backend))
        ctx = client_ctx(pki, ssl.TLSVersion.TLSv1_3)
        first = await visit(port, ctx, watch_s=0.3)
        assert first.early_bytes == 0, "the server sent records before it had the request"
        assert first.session is not None and first.session.has_ticket  # they came with the 101
        resumed = await visit(port, ctx, first.session, watch_s=0.3)
        assert resumed.reused and resumed.early_bytes == 0


async def test_an_unreachable_libssl_logs_once_and_keeps_serving(
    nursery: trio.Nursery, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> object:
        raise TicketKeysUnavailable("libssl functions not found: test")

    tickets = SessionTickets(libssl=broken)  # type: ignore[arg-type]
    with trio.fail_after(20):
        backend = await start_ws_backend(nursery)
        _app, port = await start(nursery, tls_config(tmp_path, pki, backend), tickets)
        ctx = client_ctx(pki, ssl.TLSVersion.TLSv1_3)
        first = await visit(port, ctx)
        second = await visit(port, ctx, first.session)
        assert second.status_line.startswith(b"HTTP/1.1 101") and second.reused  # OpenSSL's own key
        lines = [r.getMessage() for r in caplog.records if "event=tls_tickets_fallback" in r.getMessage()]
        assert len(lines) == 1 and "libssl functions not found: test" in lines[0], lines
        assert tickets.fallback_reason == "libssl functions not found: test"


async def test_sessions_resume_across_sighup_of_a_real_process(nursery: trio.Nursery, tmp_path: Path, pki: Pki) -> None:
    from tests.kit.process import make_config, run_proxy
    from tests.kit.servers import closed_port, start_backend

    backend = await start_backend(nursery, "b1")
    port, admin_port = closed_port(), closed_port()
    config = make_config(
        listeners={"main": {"bind": f"127.0.0.1:{port}", "tls": {"cert": str(pki.cert_pem), "key": str(pki.key_pem)}}},
        pools={"echo": {"backends": [{"address": f"127.0.0.1:{backend.port}"}]}},
        routes=[("/", "echo")],
        admin_port=admin_port,
    )
    async with run_proxy(tmp_path, config, ports=[port]) as proxy:
        ctx = client_ctx(pki, ssl.TLSVersion.TLSv1_3)
        first = await visit(port, ctx)
        assert (await visit(port, ctx, first.session)).reused
        write_leaf(pki.ca.issue_cert("localhost", "127.0.0.1"), tmp_path, "server")  # a renewed certificate
        output = await proxy.reload()
        assert "event=reloaded" in output, output
        assert (await visit(port, ctx, first.session)).reused, proxy.log()
        assert "tls_tickets_fallback" not in proxy.log()
