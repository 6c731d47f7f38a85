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

import hashlib
import ipaddress
import shutil
import struct
from collections.abc import Iterable
from pathlib import Path

import h11
import websockets.client
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


def main() -> None:
    counts = {
        "frames": _write("frames", frame_seeds()),
    }
    for target, count in counts.items():
        print(f"{target:<14} {count:>3} seeds")


if __name__ == "__main__":
    main()
