"""End to end: no credential reaches the log, whatever the request (issue 15, item 4).

A real ``wsproxy run`` subprocess (log level debug, text and JSON formats)
gets every kind of malformed or refused request with the credential
``SECRET-xyz`` in the target's query, in a header value and in a malformed
header line, then one accepted session whose token and query hold it; after
SIGTERM every line of its log is searched for the credential. The test first
checks that each request was refused with the status expected and logged
(one ``event=refused`` line each), so it cannot pass by logging nothing.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest
import trio

from tests.kit.backends import answer_101, start_recording_backend
from tests.kit.process import run_wsproxy, write_config
from tests.kit.servers import closed_port, raw_request, status_of

SECRET = b"SECRET-xyz"
GOOD_TOKEN = SECRET + b"-accepted"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="

HEADERS = b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n"


def req(target: bytes = b"/chat", host: bytes = b"127.0.0.1", extra: bytes = b"", *, method: bytes = b"GET", headers: bytes = HEADERS) -> bytes:
    return method + b" " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + headers + extra + b"\r\n"


Q = b"?access_token=" + SECRET

#: (request, status): each refused, each with the credential somewhere in it.
REFUSED = {
    "absolute-form target": (req(b"http://h/chat" + Q), 400),
    "authority-form target": (req(SECRET + b".example:443"), 400),
    "malformed request line": (b"GET /chat" + Q + b" HTTP/1.1 extra\r\nHost: a\r\n" + HEADERS + b"\r\n", 400),
    "malformed header line": (req(extra=b"Authorization : Bearer " + SECRET + b"\r\n"), 400),
    "header name with a bad character": (req(extra=b"X(" + SECRET + b"): 1\r\n"), 400),
    "continuation line": (req(extra=b"X-A: 1\r\n " + SECRET + b"\r\n"), 400),
    "control character in a value": (req(extra=b"X-Token: " + SECRET + b"\x01\r\n"), 400),
    "bare LF": (req(extra=b"X-Token: " + SECRET + b"\n"), 400),
    "Content-Length": (req(extra=b"Content-Length: " + SECRET + b"\r\n"), 400),
    "Content-Length twice": (req(extra=b"Content-Length: 0\r\nContent-Length: " + SECRET + b"\r\n"), 400),
    "Transfer-Encoding": (req(extra=b"Transfer-Encoding: " + SECRET + b"\r\n"), 400),
    "invalid Host": (req(host=SECRET + b"..example"), 400),
    "Host with a bad port": (req(host=b"a:" + SECRET), 400),
    "two Hosts": (req(extra=b"Host: " + SECRET + b"\r\n"), 400),
    "method": (req(method=SECRET), 400),
    "Upgrade": (req(headers=HEADERS.replace(b"websocket", SECRET)), 426),
    "Sec-WebSocket-Key": (req(headers=HEADERS.replace(KEY, SECRET)), 400),
    "Sec-WebSocket-Version": (req(headers=HEADERS.replace(b": 13", b": " + SECRET)), 426),
    "encoded slash": (req(b"/chat%2f" + Q), 400),
    "dot segments above the root": (req(b"/../chat" + Q), 400),
    "malformed escape": (req(b"/chat%zz" + Q), 400),
    "fragment": (req(b"/chat" + Q + b"#x"), 400),
    "no route": (req(b"/nowhere" + Q), 404),
    "ambiguous path parameters": (req(b"/chat;x" + Q), 400),
    "wrong token in the query": (req(b"/chat" + Q), 401),
    "wrong token in the header": (req(extra=b"Authorization: Bearer " + SECRET + b"\r\n"), 401),
    "head too large": (req(extra=b"X-Big: " + SECRET + b"x" * 9000 + b"\r\n"), 431),
}


def config_text(port: int, backend_port: int, fmt: str) -> str:
    digest = hashlib.sha256(GOOD_TOKEN).hexdigest()
    return f"""\
        listeners:
          - name: public
            bind: 127.0.0.1:{port}
        routes:
          - path: /chat
            pool: main
            auth:
              sources: ["header", "query:access_token"]
              tokens: [{{name: ops, sha256: "{digest}"}}]
          - path: /open
            pool: main
        pools:
          main:
            backends:
              - address: 127.0.0.1:{backend_port}
        limits:
          max_header_bytes: 8192
        log:
          format: {fmt}
          level: debug
        shutdown:
          timeout: 2s
          spread: 0s
        """


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_no_log_line_holds_a_credential(tmp_path: Path, fmt: str) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            backend_port, recorder = await start_recording_backend(nursery, answer_101())
            port = closed_port()
            config = write_config(tmp_path, config_text(port, backend_port, fmt))
            log_path = tmp_path / "wsproxy.log"
            async with run_wsproxy(config, log_path=log_path, port=port) as proxy:
                for name, (request, status) in REFUSED.items():
                    response = await raw_request(port, request, read_timeout_s=3.0)
                    assert response and status_of(response) == status, (name, response[:80])
                assert recorder.received == b""
                # accepted: the credential in the header and in the open route's query
                for request in (
                    req(b"/chat?room=1", extra=b"Authorization: Bearer " + GOOD_TOKEN + b"\r\n"),
                    req(b"/chat?access_token=" + GOOD_TOKEN),
                    req(b"/open" + Q),
                ):
                    response = await raw_request(port, request, read_timeout_s=0.5)
                    assert status_of(response) == 101, response[:80]
                proxy.signal(signal.SIGTERM)
                assert await proxy.wait_exit(10) == 0
            nursery.cancel_scope.cancel()
    lines = log_path.read_bytes().splitlines()
    refused = [line for line in lines if b"refused" in line and b"status" in line]
    opened = [line for line in lines if b"open" in line and b"backend" in line]
    assert len(refused) >= len(REFUSED), b"\n".join(lines).decode(errors="replace")
    assert len(opened) >= 3, b"\n".join(lines).decode(errors="replace")
    if fmt == "json":
        for line in lines:
            json.loads(line)  # every line is one JSON object
    leaks = [line for line in lines if SECRET.lower() in line.lower()]
    assert not leaks, b"\n".join(leaks).decode(errors="replace")
