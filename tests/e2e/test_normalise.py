"""End to end: the request is routed, authorised and forwarded in one normal form (issue 15, items 2, 3, 9).

A real proxy on loopback with the routes of the issue's report::

    /admin                     → auth: tokens   (path_ignore_case in one test)
    host secure.example.com    → auth: tokens
    /                          → no auth

written as YAML and loaded by ``load_config``, in front of a raw backend that
records every byte it receives and completes a correct 101. Each spelling that
reached the backend without a token before must now be refused (401 from the
guarded route, or 400) with nothing at the backend; with the token, the
backend sees the normalised target and Host, the ones the proxy routed on. On
the open route, headers that claim an identity, a client address or a URL
never reach the backend.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from tests.kit.backends import answer_101, start_recording_backend
from tests.kit.servers import raw_request, status_of
from wsproxy.app import App
from wsproxy.config.load import load_config

TEST_TIMEOUT_S = 10.0
TOKEN = "letmein-0123456789"


@pytest.fixture(autouse=True)
def _proxy_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")


def routes(*, ignore_case: bool = False) -> list[dict[str, Any]]:
    auth = {"tokens": [{"name": "ops", "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}
    admin: dict[str, Any] = {"path": "/admin", "pool": "main", "auth": auth}
    if ignore_case:
        admin["path_ignore_case"] = True
    return [admin, {"host": "secure.example.com", "pool": "main", "auth": auth}, {"pool": "main"}]


async def start(nursery: trio.Nursery, tmp_path: Path, backend_port: int, **route_options: Any) -> int:
    document = {
        "listeners": [{"name": "edge", "bind": "127.0.0.1:0"}],
        "pools": {"main": {"backends": [{"address": f"127.0.0.1:{backend_port}"}]}},
        "routes": routes(**route_options),
    }
    path = tmp_path / "wsproxy.yaml"
    path.write_text(yaml.safe_dump(document))
    app = App(load_config(str(path)))
    addresses = await nursery.start(app.serve)
    return int(addresses["edge"][0][1])


def upgrade(target: bytes, host: bytes = b"127.0.0.1", *headers: bytes) -> bytes:
    return (
        b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


BEARER = b"Authorization: Bearer " + TOKEN.encode()

#: Issue 15 item 2: each of these opened a session on the open route without a token.
BYPASSES = {
    "percent-encoded letter": (b"/%61dmin", b"127.0.0.1", 401),
    "double slash": (b"//admin", b"127.0.0.1", 401),
    "dot segments": (b"/x/../admin", b"127.0.0.1", 401),
    "encoded dots": (b"/x/%2E%2e/admin/ws", b"127.0.0.1", 401),
    "path parameter": (b"/admin;x", b"127.0.0.1", 400),
    "parameter on a dot segment": (b"/public/..;/admin", b"127.0.0.1", 400),
    "encoded slash": (b"/admin%2f", b"127.0.0.1", 400),
    "host trailing dot": (b"/", b"secure.example.com.", 401),
    "host case and port": (b"/", b"SECURE.Example.com.:8080", 401),
}


@pytest.mark.parametrize("case", list(BYPASSES.values()), ids=list(BYPASSES))
async def test_a_spelling_of_a_guarded_route_is_guarded(tmp_path: Path, case: tuple[bytes, bytes, int]) -> None:
    target, host, status = case
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            backend_port, recorder = await start_recording_backend(nursery, answer_101())
            port = await start(nursery, tmp_path, backend_port)
            response = await raw_request(port, upgrade(target, host))
            assert status_of(response) == status, response
            assert recorder.connections == 0 and recorder.received == b""
            nursery.cancel_scope.cancel()


async def test_case_is_guarded_with_path_ignore_case(tmp_path: Path) -> None:
    """``/Admin`` passes as the open route by default (documented); with the option it needs the token."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            backend_port, recorder = await start_recording_backend(nursery, answer_101())
            port = await start(nursery, tmp_path, backend_port, ignore_case=True)
            for target in (b"/Admin", b"/ADMIN/x", b"/%41dmin"):
                assert status_of(await raw_request(port, upgrade(target))) == 401, target
            assert recorder.received == b""
            response = await raw_request(port, upgrade(b"/Admin", b"127.0.0.1", BEARER), read_timeout_s=1.0)
            assert status_of(response) == 101
            assert recorder.received.startswith(b"GET /Admin HTTP/1.1\r\n")  # the case is the client's
            nursery.cancel_scope.cancel()


async def test_the_backend_gets_the_target_and_host_the_proxy_routed_on(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            backend_port, recorder = await start_recording_backend(nursery, answer_101())
            port = await start(nursery, tmp_path, backend_port)
            request = upgrade(b"//x/../%61dmin/./ws?room=%2e%2E&x=//", b"127.0.0.1", BEARER)
            assert status_of(await raw_request(port, request, read_timeout_s=1.0)) == 101
            assert recorder.received.startswith(b"GET /admin/ws?room=%2e%2E&x=// HTTP/1.1\r\n")
            before = len(recorder.received)
            request = upgrade(b"/", b"Secure.Example.COM.:8080", BEARER)
            assert status_of(await raw_request(port, request, read_timeout_s=1.0)) == 101
            head = recorder.received[before:]
            assert re.search(rb"(?im)^host: secure\.example\.com:8080\r$", head), head
            assert re.search(rb"(?im)^x-forwarded-host: secure\.example\.com:8080\r$", head), head
            nursery.cancel_scope.cancel()


#: Issue 15 item 3: on the open route these reached the backend as sent.
SPOOFED = [
    b"X-Auth-Subject: root",
    b"X_Auth_Subject: root",
    b"X-Auth-Claim-Role: admin",
    b"x_auth_claim_tenant: acme",
    b"X-Real-IP: 6.6.6.6",
    b"X-Client-IP: 6.6.6.6",
    b"True-Client-IP: 6.6.6.6",
    b"X-Forwarded-Port: 443",
    b"X-Forwarded-Ssl: on",
    b"X-Original-URL: /admin",
    b"X-Rewrite-URL: /admin",
    b"X-Cluster-Client-IP: 6.6.6.6",
]


async def test_identity_and_spoofable_headers_never_reach_the_backend_of_an_open_route(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            backend_port, recorder = await start_recording_backend(nursery, answer_101())
            port = await start(nursery, tmp_path, backend_port)
            request = upgrade(b"/open", b"127.0.0.1", *SPOOFED, b"X-Kept: yes")
            assert status_of(await raw_request(port, request, read_timeout_s=1.0)) == 101
            head = recorder.received.split(b"\r\n\r\n", 1)[0].lower()
            assert b"x-kept: yes" in head
            for line in SPOOFED:
                name = line.split(b":", 1)[0].lower()
                assert name + b":" not in head, name
            assert b"6.6.6.6" not in head and b"root" not in head
            nursery.cancel_scope.cancel()


async def test_a_control_character_in_a_header_value_is_refused(tmp_path: Path) -> None:
    """Issue 15 item 9: h11 passes 0x01; the backend must not get it."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            backend_port, recorder = await start_recording_backend(nursery, answer_101())
            port = await start(nursery, tmp_path, backend_port)
            for value in (b"a\x01b", b"a\x1fb", b"a\x7fb"):
                response = await raw_request(port, upgrade(b"/", b"127.0.0.1", b"X-Note: " + value))
                assert status_of(response) == 400, value
            assert recorder.received == b""
            nursery.cancel_scope.cancel()
