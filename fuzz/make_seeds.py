"""Write the committed seed corpus, fuzz/corpus/<target>/, from real peers.

Frames come from wsproto's frame protocol (masked as a client, plain as a
server, with and without permessage-deflate), upgrade requests from wsproto's
and websockets' clients, 101 responses from websockets' and wsproto's servers,
PROXY headers from the layout in HAProxy's spec, configs from conf/ and small
variants. Run it again after changing an input layout:

    .venv/bin/python -m fuzz.make_seeds

It replaces the seed directories; file names are the SHA-1 of the content, as
libFuzzer names its own corpus files. This is a tool, not part of wsproxy.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import random
import re
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import h11
import websockets.client
import websockets.datastructures
import websockets.server
from websockets.http11 import Request as WsRequest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol

HERE = Path(__file__).parent
ROOT = HERE.parent


def _write(target: str, seeds: Iterable[bytes]) -> int:
    directory = HERE / "corpus" / target
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    count = 0
    for seed in seeds:
        (directory / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        count += 1
    return count


# -- frames -------------------------------------------------------------------------------


def _deflate() -> PerMessageDeflate:
    ext = PerMessageDeflate()
    ext.finalize("permessage-deflate")
    return ext


def _frame_streams(client: bool, deflate: bool) -> list[bytes]:
    def fp() -> FrameProtocol:
        return FrameProtocol(client=client, extensions=[_deflate()] if deflate else [])

    streams = []
    p = fp()
    streams.append(bytes(p.send_data("hello, world")))
    streams.append(bytes(p.send_data(b"\x00\x01\x02" * 50)))  # 16-bit length
    streams.append(bytes(p.send_data(b"x" * 70000)))  # 64-bit length
    p = fp()
    streams.append(bytes(p.send_data("frag", fin=False) + p.ping(b"keep") + p.send_data("mented", fin=True)))
    p = fp()
    streams.append(bytes(p.send_data(b"a" * 10) + p.pong(b"proxy-ping") + p.send_data(b"b" * 3)))
    p = fp()
    streams.append(bytes(p.close(1000, "bye")))
    p = fp()
    streams.append(bytes(p.send_data("last") + p.close(1001)))
    p = fp()
    streams.append(bytes(p.ping(b"") + p.pong(b"") + p.close()))
    p = fp()
    streams.append(bytes(p.send_data("\u00e9t\u00e9 \U0001f600") + p.send_data("caf\u00e9", fin=False) + p.send_data("!")))
    return streams


def _frame_seed(stream: bytes, *, client: bool, deflate: bool, limit: int | None = None,
                ping: bytes | None = None, splits: tuple[int, ...] = ()) -> bytes:
    flags = int(client) | (2 if deflate else 0) | (8 if limit is not None else 0) | (16 if ping is not None else 0)
    out = bytearray([flags])
    if limit is not None:
        out += struct.pack(">H", limit)
    if ping is not None:
        out += bytes([len(ping)]) + ping
    out.append(len(splits))
    for split in splits:
        out += struct.pack(">H", split)
    return bytes(out + stream)


def frame_seeds() -> list[bytes]:
    seeds = []
    for client in (True, False):
        for deflate in (False, True):
            for i, stream in enumerate(_frame_streams(client, deflate)):
                if len(stream) > 4000:
                    stream = stream[:200]  # a header of a long frame and the start of its payload
                splits = (1, 2, 7) if i % 2 else ()
                seeds.append(_frame_seed(stream, client=client, deflate=deflate, splits=splits))
            stream = _frame_streams(client, deflate)[4]
            seeds.append(_frame_seed(stream, client=client, deflate=deflate, ping=b"proxy-ping", splits=(12,)))
            seeds.append(_frame_seed(_frame_streams(client, deflate)[1], client=client, deflate=deflate, limit=100))
    # A few violations: an unmasked client frame, a reserved opcode, a long control frame.
    seeds.append(_frame_seed(b"\x81\x02hi", client=True, deflate=False))
    seeds.append(_frame_seed(b"\x83\x00", client=False, deflate=False))
    seeds.append(_frame_seed(b"\x89\x7e\x00\x80" + b"p" * 128, client=False, deflate=False))
    return seeds


# -- handshakes ---------------------------------------------------------------------------

#: fuzz_handshake.KEY and its Sec-WebSocket-Accept (RFC 6455 §1.3's example).
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _wsproto_request(**kwargs: object) -> bytes:
    client = WSConnection(ConnectionType.CLIENT)
    return client.send(Request(**kwargs))  # type: ignore[arg-type]


def _websockets_request(uri: str, **kwargs: object) -> bytes:
    from websockets.uri import parse_uri

    client = websockets.client.ClientProtocol(parse_uri(uri), **kwargs)  # type: ignore[arg-type]
    client.send_request(client.connect())
    wire = b"".join(client.data_to_send())
    key = base64.b64encode(os.urandom(16))  # websockets draws its key from the system's generator
    return re.sub(rb"Sec-WebSocket-Key: [^\r]*", b"Sec-WebSocket-Key: " + key, wire)


def request_heads() -> list[bytes]:
    heads = [
        _wsproto_request(host="example.com", target="/"),
        _wsproto_request(host="chat.example.com:8080", target="/chat/room?x=1&access_token=t",
                         subprotocols=["chat", "superchat"]),
        _wsproto_request(host="[2001:db8::1]:443", target="/a/./b/../c//d", extensions=[PerMessageDeflate()]),
        _wsproto_request(host="example.com", target="/%61dmin;x", extra_headers=[(b"Origin", b"https://app.example"),
                         (b"Cookie", b"session=abc"), (b"Authorization", b"Bearer tok")]),
        _websockets_request("ws://example.com/chat?room=1", subprotocols=["chat"]),
        _websockets_request("ws://localhost:8080/", origin="http://localhost:8000"),
    ]
    base = heads[0]
    heads += [
        base.replace(b"GET", b"POST"),
        base.replace(b"HTTP/1.1", b"HTTP/1.0"),
        base.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"),
        base.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        base.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
        base.replace(b"\r\nHost", b"\r\n Host"),
        b"GET http://example.com/chat HTTP/1.1\r\nHost: example.com\r\n\r\n",
    ]
    # A plain HTTP request from h11, as a browser hitting the WebSocket port sends.
    conn = h11.Connection(h11.CLIENT)
    heads.append(conn.send(h11.Request(method="GET", target="/index.html",
                                       headers=[("Host", "example.com"), ("Accept", "*/*")])) or b"")
    return [b"\x00" + head for head in heads]


def response_heads() -> list[bytes]:
    seeds = []
    for flags, subprotocols, deflate in ((1, [], False), (3, ["chat", "superchat"], False), (5, [], True),
                                         (7, ["chat", "superchat"], True)):
        # websockets' server answering the client request fuzz_handshake sends for these flags.
        headers = [("Host", "backend.example"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
                   ("Sec-WebSocket-Key", KEY), ("Sec-WebSocket-Version", "13")]
        if subprotocols:
            headers.append(("Sec-WebSocket-Protocol", ", ".join(subprotocols)))
        if deflate:
            headers.append(("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"))
        request = WsRequest("/chat", websockets.datastructures.Headers(headers))
        server = websockets.server.ServerProtocol(subprotocols=subprotocols or None)
        if deflate:
            from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory

            server = websockets.server.ServerProtocol(
                subprotocols=subprotocols or None, extensions=[ServerPerMessageDeflateFactory()])
        response = server.accept(request)
        server.send_response(response)
        wire = b"".join(server.data_to_send())
        wire = re.sub(rb"Date: [^\r]*", b"Date: Thu, 01 Jan 2026 00:00:00 GMT", wire)  # reproducible seeds
        seeds.append(bytes([flags]) + wire)
        # wsproto's server, the same way.
        wsserver = WSConnection(ConnectionType.SERVER)
        wsserver.receive_data(b"GET /chat HTTP/1.1\r\n" + b"".join(
            f"{name}: {value}\r\n".encode() for name, value in headers) + b"\r\n")
        event = next(iter(wsserver.events()))
        assert isinstance(event, Request), event
        accept = AcceptConnection(subprotocol=subprotocols[0] if subprotocols else None,
                                  extensions=[PerMessageDeflate()] if deflate else [])
        seeds.append(bytes([flags]) + wsserver.send(accept))
    ok = seeds[0]
    seeds += [
        ok.replace(b"101 Switching Protocols", b"101"),
        ok.replace(b"Upgrade: websocket", b"Upgrade: websocket\r\n\tfolded"),
        ok.replace(b"HTTP/1.1", b"HTTP/1.0"),
        b"\x01HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nforbidden\n",
        b"\x01HTTP/1.1 100 Continue\r\n\r\n",
        b"\x01HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\nConnection: close\r\n\r\n",
    ]
    return seeds


# -- PROXY protocol -----------------------------------------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def _v2(command: int, family: int, block: bytes, tlvs: bytes = b"", crc: bool = False) -> bytes:
    if crc:
        tlvs += b"\x03\x00\x04\x00\x00\x00\x00"
    body = block + tlvs
    header = V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack(">H", len(body)) + body
    if crc:
        header = header[:-4] + struct.pack(">I", _crc32c(header))
    return header


def proxy_seeds() -> list[bytes]:
    v1 = [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n",
        b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 65535\r\n",
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET / HTTP/1.1\r\n",
        b"PROXY TCP4 192.0.2.01 198.51.100.2 56324 443\r\n",
        b"GET / HTTP/1.1\r\n",
    ]
    four = bytes(ipaddress.IPv4Address("192.0.2.1").packed) + ipaddress.IPv4Address("203.0.113.9").packed
    six = ipaddress.IPv6Address("2001:db8::1").packed + ipaddress.IPv6Address("::ffff:192.0.2.7").packed
    v2 = [
        _v2(1, 0x11, four + struct.pack(">HH", 56324, 443)),
        _v2(1, 0x21, six + struct.pack(">HH", 1, 8080)),
        _v2(1, 0x11, four + struct.pack(">HH", 56324, 443), tlvs=b"\x01\x00\x08http/1.1", crc=True),
        _v2(0, 0x00, b""),
        _v2(1, 0x00, b""),
        _v2(1, 0x31, bytes(216)),
        _v2(1, 0x12, four + struct.pack(">HH", 53, 53)),
        _v2(1, 0x11, four + struct.pack(">HH", 56324, 443)) + b"\x16\x03\x01",
    ]
    return [b"\x00" + seed for seed in v1] + [b"\x01" + seed for seed in v2]


# -- router -------------------------------------------------------------------------------


def router_seeds() -> list[bytes]:
    # Routes (host, path) index fuzz_router.HOSTS and PATHS: [/admin → host secure, /admin, /].
    table = bytes([2, 3, 1, 0, 1, 0, 0])
    hosts = [b"example.com", b"secure.example.com", b"a.b.example.com", b"secure.example.com."]
    targets = [b"/", b"/admin", b"/admin/x?token=1", b"/%61dmin", b"//admin", b"/x/../admin", b"/Admin",
               b"/admin;x", b"/admin%2f", b"/chat/./room", b"/a/%2e%2e/admin?q=%2e%2e", b"/%7Euser/%7e"]
    seeds = []
    for i, target in enumerate(targets):
        host = hosts[i % len(hosts)]
        seeds.append(table + bytes([len(host)]) + host + target)
    return seeds


# -- config -------------------------------------------------------------------------------


def config_seeds() -> list[bytes]:
    minimal = (ROOT / "tests" / "config" / "test_load.py").read_text().split('MINIMAL = """\\\n', 1)[1]
    minimal = minimal.split('"""', 1)[0]
    seeds = [
        (ROOT / "conf" / "wsproxy.yaml").read_bytes(),
        (ROOT / "wsproxy" / "demo" / "conf" / "demo.yaml").read_bytes(),
        minimal.encode(),
        minimal.encode() + b"timeouts: {handshake: 5s, idle: 1m30s}\nlimits:\n  max_message_bytes: 16MiB\n",
        minimal.encode() + b"admin:\n  bind: 127.0.0.1:9090\nlog: {format: json}\n",
        minimal.replace("  - pool: echo", '  - host: "*.example.com"\n    path: /chat\n    pool: echo\n'
                        "    auth:\n      tokens_file: tokens\n").encode(),
        minimal.replace("    backends:", "    sticky:\n      key: cookie:s\n      cookie: {secret_file: demo-cookie.key}\n"
                        "    backends:").encode(),
        b"defaults: &d {interval: 2s}\n" + minimal.encode() + b"shutdown:\n  <<: *d\n",
        b"listeners: [\n",
        b"listeners:\n  - name: a\n    bind: nope\nroutes: []\npools: {}\n",
        b"\xff\xfe not utf-8\n",
        b"",
    ]
    return seeds


def main() -> None:
    # Masks and Sec-WebSocket-Key values come from os.urandom: make them reproducible.
    generator = random.Random(6455)
    os.urandom = generator.randbytes
    counts = {
        "frames": _write("frames", frame_seeds()),
        "handshake": _write("handshake", request_heads() + response_heads()),
        "proxy_protocol": _write("proxy_protocol", proxy_seeds()),
        "router": _write("router", router_seeds()),
        "config": _write("config", config_seeds()),
    }
    for target, count in counts.items():
        print(f"{target:<14} {count:>3} seeds")


if __name__ == "__main__":
    main()
