"""End-to-end tests of PROXY protocol listeners and ``trusted_proxies``.

A raw TCP client plays the L4 balancer: it sends a PROXY header (v1 text or v2
binary, built here byte by byte from the specification) and then the client's
own bytes, an upgrade request or a TLS handshake. Backends are raw recorders
that keep each request head, so a test reads the X-Forwarded-For and
Forwarded the proxy sent, and can show that nothing of a refused connection
reached a backend. Configs are YAML files loaded with ``load_config``; the
proxy runs in-process on 127.0.0.1.

What is not here: the parser's corner cases, which ``tests/proto/test_proxy_protocol.py``
covers without sockets.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from tests.kit.backends import (
    HeadRecorder as Recorder,
    header_values,
    start_holding_backend as start_recording_backend,
)
from tests.kit.process import write_config
from tests.kit.servers import start_proxy_from, status_of
from tests.kit.tls import Pki, client_hello, make_pki, q
from tests.kit.wait import SLACK_S, wait_for_log
from tests.kit.ws import UPGRADE_REQUEST, read_head, read_until_eof


@pytest.fixture(autouse=True)
def _proxy_log(caplog: pytest.LogCaptureFixture) -> None:
    """Keep the proxy's INFO lines: some tests assert on them, every failure shows them."""
    caplog.set_level(logging.INFO, logger="wsproxy")


# --- PROXY headers (HAProxy doc/proxy-protocol.txt) ---------------------------------------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, source_port: int = 40000, destination: str | None = None, destination_port: int = 443) -> bytes:
    """A v1 line: "PROXY TCP4|TCP6 src dst sport dport\\r\\n"."""
    family = "TCP6" if ":" in source else "TCP4"
    destination = destination or ("2001:db8::1" if family == "TCP6" else "203.0.113.1")
    return f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()


V1_UNKNOWN = b"PROXY UNKNOWN\r\n"


def v2(source: str, source_port: int = 40000, *, tlvs: bytes = b"") -> bytes:
    """A v2 PROXY command over TCP (version 2, command PROXY, STREAM) from ``source``."""
    address = ipaddress.ip_address(source)
    if address.version == 4:
        family, block = 0x11, address.packed + ipaddress.IPv4Address("203.0.113.1").packed
    else:
        family, block = 0x21, address.packed + ipaddress.IPv6Address("2001:db8::1").packed
    block += struct.pack("!HH", source_port, 443) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


#: v2 LOCAL (the balancer's own health check): no addresses, the TCP peer stays the client.
V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


# --- the proxy ------------------------------------------------------------------------------------


def pp_config(
    backend_ports: Sequence[int],
    *,
    pki: Pki | None = None,
    trusted: Sequence[str] | None = None,
    sticky_ip: bool = False,
    handshake: str = "5s",
    per_ip: int = 0,
) -> str:
    """Listeners "plain" (no PROXY header), "pp1" (v1), "pp2" (v2), and "tls" (TLS + v1) when
    ``pki`` is given; one route to pool "main" over ``backend_ports``."""
    listeners = [
        "  - name: plain\n    bind: 127.0.0.1:0",
        "  - name: pp1\n    bind: 127.0.0.1:0\n    proxy_protocol: v1",
        "  - name: pp2\n    bind: 127.0.0.1:0\n    proxy_protocol: v2",
    ]
    if pki is not None:
        listeners.append(
            "  - name: tls\n    bind: 127.0.0.1:0\n    proxy_protocol: v1\n"
            f"    tls:\n      cert: {q(pki.cert_pem)}\n      key: {q(pki.key_pem)}"
        )
    backends = "\n".join(f"      - address: 127.0.0.1:{p}" for p in backend_ports)
    text = (
        "listeners:\n" + "\n".join(listeners) + "\n"
        "routes:\n  - pool: main\n"
        "pools:\n  main:\n"
        + ("    sticky:\n      key: ip\n" if sticky_ip else "")
        + f"    backends:\n{backends}\n"
        f"timeouts:\n  handshake: {handshake}\n  connect: 2s\n  upstream_handshake: 2s\n"
        f"limits:\n  max_connections_per_ip: {per_ip}\n"
    )
    if trusted is not None:
        text += "trusted_proxies: [" + ", ".join(f'"{cidr}"' for cidr in trusted) + "]\n"
    return text


async def start(
    nursery: trio.Nursery, tmp_path: Path, backends: int = 1, **options: object
) -> tuple[dict[str, int], list[Recorder]]:
    recorders = []
    ports = []
    for _ in range(backends):
        port, recorder = await start_recording_backend(nursery)
        ports.append(port)
        recorders.append(recorder)
    config = write_config(tmp_path, pp_config(ports, **options))  # type: ignore[arg-type]
    return await start_proxy_from(nursery, config), recorders


async def send_pieces(stream: trio.SocketStream, pieces: Sequence[bytes], gap_s: float = 0.01) -> None:
    """Send each piece as its own segment (the stream has TCP_NODELAY), pausing between them."""
    for index, piece in enumerate(pieces):
        if index:
            await trio.sleep(gap_s)
        await stream.send_all(piece)


async def upgrade_through(port: int, pieces: Sequence[bytes], gap_s: float = 0.01) -> tuple[trio.SocketStream, bytes]:
    """Send ``pieces`` (PROXY header and request, however split) and read the response head.

    Returns the still open stream (a 101 keeps the session up) and the head."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await send_pieces(stream, pieces, gap_s)
        return stream, await read_head(stream)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def closed_without_answer(port: int, data: bytes, *, within_s: float) -> tuple[bytes, float]:
    """Send ``data``, keep the connection open, and wait for the proxy to close it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        start = trio.current_time()
        await stream.send_all(data)
        with trio.fail_after(within_s):
            raw = await read_until_eof(stream)
        return raw, trio.current_time() - start


def forwarded_for(head: bytes) -> list[bytes]:
    return header_values(head, b"x-forwarded-for")


async def assert_nothing_reached(recorders: Sequence[Recorder]) -> None:
    await trio.sleep(0.2)  # anything in flight would have landed by now
    assert [r.connections for r in recorders] == [0] * len(recorders)


# === 1. the address in the header is the client address ==============================================

HEADERS = {
    "v1 TCP4": ("pp1", v1("198.51.100.2", 40000), "198.51.100.2", "198.51.100.2:40000"),
    "v1 TCP6": ("pp1", v1("2001:db8::7", 40001), "2001:db8::7", "[2001:db8::7]:40001"),
    "v1 UNKNOWN": ("pp1", V1_UNKNOWN, "127.0.0.1", "127.0.0.1:"),
    "v1 UNKNOWN with addresses": ("pp1", b"PROXY UNKNOWN ff::1 ff::2 1 2\r\n", "127.0.0.1", "127.0.0.1:"),
    "v2 IPv4": ("pp2", v2("198.51.100.2", 40002), "198.51.100.2", "198.51.100.2:40002"),
    "v2 IPv6": ("pp2", v2("2001:db8::7", 40003), "2001:db8::7", "[2001:db8::7]:40003"),
    "v2 IPv4-mapped IPv6": ("pp2", v2("::ffff:198.51.100.9", 40004), "198.51.100.9", "198.51.100.9:40004"),
    "v2 IPv4 with TLVs": (
        "pp2",
        v2("198.51.100.3", 40005, tlvs=tlv(0x01, b"http/1.1") + tlv(0x02, b"chat.example.com")),
        "198.51.100.3",
        "198.51.100.3:40005",
    ),
    "v2 LOCAL": ("pp2", V2_LOCAL, "127.0.0.1", "127.0.0.1:"),
}


@pytest.mark.parametrize(("listener", "header", "ip", "peer"), list(HEADERS.values()), ids=list(HEADERS))
async def test_the_proxy_header_address_is_the_client_address(
    nursery: trio.Nursery,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    listener: str,
    header: bytes,
    ip: str,
    peer: str,
) -> None:
    with trio.fail_after(10):
        ports, (recorder,) = await start(nursery, tmp_path)
        stream, head = await upgrade_through(ports[listener], [header + UPGRADE_REQUEST])
        async with stream:
            assert head.startswith(b"HTTP/1.1 101 "), head
            opened = await wait_for_log(caplog, "event=open")
        closed = await wait_for_log(caplog, "event=close")
    upstream = recorder.last
    assert forwarded_for(upstream) == [ip.encode()]
    (forwarded,) = header_values(upstream, b"forwarded")
    node = f'"[{ip}]"' if ":" in ip else ip
    assert forwarded.startswith(f"for={node};".encode()), forwarded
    for line in (opened, closed):
        assert f" peer={peer}" in line, line
    # Nothing of the header itself went upstream.
    assert b"PROXY" not in upstream and b"QUIT" not in upstream
    assert upstream.startswith(b"GET /chat HTTP/1.1\r\n")


SPLITS = ["one segment", "header then request", "last header byte with the request", "byte by byte"]


def split(header: bytes, request: bytes, how: str) -> list[bytes]:
    if how == "one segment":
        return [header + request]
    if how == "header then request":
        return [header, request]
    if how == "last header byte with the request":  # v1: the CR ends one segment, the LF starts the next
        return [header[:-1], header[-1:] + request]
    data = header + request
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_header_and_request_arrive_however_split(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, version: str, how: str
) -> None:
    header = v1("198.51.100.2", 40000) if version == "v1" else v2("198.51.100.2", 40000)
    with trio.fail_after(10):
        ports, (recorder,) = await start(nursery, tmp_path)
        gap_s = 0.001 if how == "byte by byte" else 0.05
        port = ports["pp1" if version == "v1" else "pp2"]
        stream, head = await upgrade_through(port, split(header, UPGRADE_REQUEST, how), gap_s)
        async with stream:
            assert head.startswith(b"HTTP/1.1 101 "), head
            await wait_for_log(caplog, "event=open", "peer=198.51.100.2:40000")
    assert recorder.last.startswith(b"GET /chat HTTP/1.1\r\n")  # no byte lost or doubled at the seam
    assert forwarded_for(recorder.last) == [b"198.51.100.2"]


# === 2. TLS behind the PROXY header ===================================================================


class PrefixedStream(trio.abc.Stream):
    """A stream that puts ``prefix`` in front of its first send: PROXY header + ClientHello in one segment."""

    def __init__(self, inner: trio.SocketStream, prefix: bytes) -> None:
        self.inner, self.prefix = inner, prefix

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        prefix, self.prefix = self.prefix, b""
        await self.inner.send_all(prefix + bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("coalesced", [False, True], ids=["header then handshake", "header with the ClientHello"])
async def test_tls_after_the_proxy_header(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, coalesced: bool
) -> None:
    pki = make_pki(tmp_path)
    header = v1("2001:db8::42", 50000)
    with trio.fail_after(10):
        ports, (recorder,) = await start(nursery, tmp_path, pki=pki)
        tcp = await trio.open_tcp_stream("127.0.0.1", ports["tls"])
        if coalesced:
            inner: trio.abc.Stream = PrefixedStream(tcp, header)
        else:
            await tcp.send_all(header)
            inner = tcp
        stream = trio.SSLStream(inner, pki.client_context(), server_hostname="localhost")
        async with stream:
            await stream.do_handshake()
            await stream.send_all(UPGRADE_REQUEST)
            head = await read_head(stream)
            assert head.startswith(b"HTTP/1.1 101 "), head
            await wait_for_log(caplog, "event=open", "peer=[2001:db8::42]:50000")
    upstream = recorder.last
    assert forwarded_for(upstream) == [b"2001:db8::42"]
    assert header_values(upstream, b"x-forwarded-proto") == [b"https"]


async def test_a_tls_listener_with_proxy_protocol_refuses_a_bare_client_hello(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        ports, recorders = await start(nursery, tmp_path, pki=make_pki(tmp_path))
        raw, _ = await closed_without_answer(ports["tls"], client_hello(), within_s=2)
        assert raw == b""
        await wait_for_log(caplog, "event=refused", "TLS handshake where a PROXY protocol")
        await assert_nothing_reached(recorders)


# === 3. bad, truncated and slow headers ============================================================


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_truncated_header_then_close_reaches_no_backend(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, version: str
) -> None:
    header = v1("198.51.100.2") if version == "v1" else v2("198.51.100.2")
    with trio.fail_after(10):
        ports, recorders = await start(nursery, tmp_path)
        stream = await trio.open_tcp_stream("127.0.0.1", ports["pp1" if version == "v1" else "pp2"])
        async with stream:
            await stream.send_all(header[: len(header) - 5])
            await stream.send_eof()
            with trio.fail_after(2):
                assert await read_until_eof(stream) == b""
        await wait_for_log(caplog, "event=refused", "closed inside the PROXY header")
        await assert_nothing_reached(recorders)


GARBAGE = {
    "plain HTTP on v1": ("pp1", UPGRADE_REQUEST),
    "plain HTTP on v2": ("pp2", UPGRADE_REQUEST),
    "v2 header on v1": ("pp1", v2("198.51.100.2") + UPGRADE_REQUEST),
    "v1 header on v2": ("pp2", v1("198.51.100.2") + UPGRADE_REQUEST),
    "lower-case proxy": ("pp1", v1("198.51.100.2").lower() + UPGRADE_REQUEST),
    "TCP4 with an IPv6 address": ("pp1", b"PROXY TCP4 2001:db8::7 203.0.113.1 40000 443\r\n" + UPGRADE_REQUEST),
    "port with a leading zero": ("pp1", b"PROXY TCP4 198.51.100.2 203.0.113.1 040000 443\r\n" + UPGRADE_REQUEST),
    "two spaces": ("pp1", b"PROXY TCP4  198.51.100.2 203.0.113.1 40000 443\r\n" + UPGRADE_REQUEST),
    "bare LF": ("pp1", b"PROXY TCP4 198.51.100.2 203.0.113.1 40000 443\n" + UPGRADE_REQUEST),
    "v1 line without an end": ("pp1", b"PROXY TCP4 " + b"1" * 120 + b"\r\n" + UPGRADE_REQUEST),
    "v2 version 1": ("pp2", V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12) + UPGRADE_REQUEST),
    "v2 UDP": ("pp2", V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12) + UPGRADE_REQUEST),
    "v2 TLV past the end": ("pp2", v2("198.51.100.2", tlvs=b"\x01\x00\x09abc") + UPGRADE_REQUEST),
    "v2 too long": ("pp2", V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(64)),
}


@pytest.mark.parametrize(("listener", "data"), list(GARBAGE.values()), ids=list(GARBAGE))
async def test_garbage_instead_of_a_header_is_closed_without_a_response(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, listener: str, data: bytes
) -> None:
    with trio.fail_after(10):
        ports, recorders = await start(nursery, tmp_path)  # handshake timeout 5 s: closing is not a timeout
        raw, elapsed = await closed_without_answer(ports[listener], data, within_s=2)
        assert raw == b"", raw
        assert elapsed < 1.0, elapsed
        await wait_for_log(caplog, "event=refused", "peer=127.0.0.1:")
        await assert_nothing_reached(recorders)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_slow_header_is_closed_after_the_handshake_timeout(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture, version: str
) -> None:
    header = v1("198.51.100.2") if version == "v1" else v2("198.51.100.2")
    with trio.fail_after(10):
        ports, recorders = await start(nursery, tmp_path, handshake="500ms")
        raw, elapsed = await closed_without_answer(
            ports["pp1" if version == "v1" else "pp2"], header[: len(header) // 2], within_s=0.5 + SLACK_S
        )
        assert raw == b""
        assert elapsed >= 0.45, elapsed
        await wait_for_log(caplog, "event=refused", "not complete in time")
        await assert_nothing_reached(recorders)


async def test_the_handshake_timeout_covers_header_and_request_together(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A header that takes most of the budget leaves only the rest for the request (one deadline from accept)."""
    with trio.fail_after(10):
        ports, recorders = await start(nursery, tmp_path, handshake="800ms")
        stream = await trio.open_tcp_stream("127.0.0.1", ports["pp1"])
        async with stream:
            start_s = trio.current_time()
            header = v1("198.51.100.2")
            await stream.send_all(header[:10])
            await trio.sleep(0.5)
            await stream.send_all(header[10:] + UPGRADE_REQUEST[:20])
            raw = await read_until_eof(stream)
            elapsed = trio.current_time() - start_s
        assert b"HTTP/1.1 101" not in raw
        assert 0.75 <= elapsed <= 0.8 + SLACK_S, elapsed
        await assert_nothing_reached(recorders)


# === 4. the PROXY address counts for stickiness and limits ===================================================

STICKY_SOURCES = [f"198.51.100.{n}" for n in (2, 3, 5, 7, 11, 13, 17, 19)]


async def backend_for(port: int, recorders: Sequence[Recorder], source: str) -> int:
    """Which backend (index) a session from PROXY ``source`` lands on."""
    before = [len(r.heads) for r in recorders]
    stream, head = await upgrade_through(port, [v1(source) + UPGRADE_REQUEST])
    async with stream:
        assert head.startswith(b"HTTP/1.1 101 "), head
    grew = [i for i, r in enumerate(recorders) if len(r.heads) > before[i]]
    assert len(grew) == 1, grew
    assert forwarded_for(recorders[grew[0]].last) == [source.encode()]
    return grew[0]


async def test_ip_stickiness_uses_the_proxy_address(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(15):
        backends = [await start_recording_backend(nursery) for _ in range(3)]
        recorders = [recorder for _, recorder in backends]
        config = pp_config([port for port, _ in backends], sticky_ip=True)
        # Two independent proxies with the same config: they must agree without sharing anything.
        ports = [
            (await start_proxy_from(nursery, write_config(tmp_path, config, name)))["pp1"] for name in ("a.yaml", "b.yaml")
        ]
        mapping: dict[str, int] = {}
        for round_ in range(2):
            for source in STICKY_SOURCES:
                for port in ports:
                    index = await backend_for(port, recorders, source)
                    assert mapping.setdefault(source, index) == index, (source, round_, mapping)
    # The TCP peer is 127.0.0.1 for all of them: more than one backend means the PROXY address was the key.
    assert len(set(mapping.values())) > 1, mapping


async def test_per_ip_limits_count_the_proxy_address(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with trio.fail_after(10):
        ports, recorders = await start(nursery, tmp_path, per_ip=1)
        first, head = await upgrade_through(ports["pp1"], [v1("198.51.100.2", 40000) + UPGRADE_REQUEST])
        async with first:
            assert head.startswith(b"HTTP/1.1 101 "), head
            other, head = await upgrade_through(ports["pp1"], [v1("198.51.100.3", 40001) + UPGRADE_REQUEST])
            async with other:  # another address behind the same balancer is another client
                assert head.startswith(b"HTTP/1.1 101 "), head
                same = await trio.open_tcp_stream("127.0.0.1", ports["pp1"])
                async with same:
                    await same.send_all(v1("198.51.100.2", 40002) + UPGRADE_REQUEST)
                    raw = await read_until_eof(same)
                assert status_of(raw) == 429, raw
        line = await wait_for_log(caplog, "event=refused", "status=429")
        assert "peer=198.51.100.2:40002" in line and "too many connections from 198.51.100.2" in line, line
        assert sum(len(r.heads) for r in recorders) == 2


# === 5. trusted_proxies =================================================================================

SPOOFED = (
    b"X-Forwarded-For: 203.0.113.7\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Forwarded-Host: public.example\r\n"
    b"Forwarded: for=203.0.113.7;proto=https\r\n"
)
SPOOFED_REQUEST = UPGRADE_REQUEST[:-2] + SPOOFED + b"\r\n"


async def upstream_head(port: int, recorder: Recorder, header: bytes = b"") -> bytes:
    stream, head = await upgrade_through(port, [header + SPOOFED_REQUEST])
    async with stream:
        assert head.startswith(b"HTTP/1.1 101 "), head
    return recorder.last


async def test_a_trusted_client_extends_the_forwarding_chain(nursery: trio.Nursery, tmp_path: Path) -> None:
    with trio.fail_after(10):
        ports, (recorder,) = await start(nursery, tmp_path, trusted=["127.0.0.1", "10.0.0.0/8"])
        upstream = await upstream_head(ports["plain"], recorder)
    assert forwarded_for(upstream) == [b"203.0.113.7, 127.0.0.1"]
    assert header_values(upstream, b"x-forwarded-proto") == [b"https"]  # kept as received
    assert header_values(upstream, b"x-forwarded-host") == [b"public.example"]
    assert header_values(upstream, b"forwarded") == [
        b'for=203.0.113.7;proto=https, for=127.0.0.1;host="127.0.0.1";proto=http'
    ]


@pytest.mark.parametrize("trusted", [None, ["10.0.0.0/8", "2001:db8::/32"]], ids=["no trusted_proxies", "peer not in them"])
async def test_an_untrusted_client_has_its_forwarding_headers_replaced(
    nursery: trio.Nursery, tmp_path: Path, trusted: list[str] | None
) -> None:
    with trio.fail_after(10):
        ports, (recorder,) = await start(nursery, tmp_path, trusted=trusted)
        upstream = await upstream_head(ports["plain"], recorder)
    assert forwarded_for(upstream) == [b"127.0.0.1"]
    assert header_values(upstream, b"x-forwarded-proto") == [b"http"]
    assert header_values(upstream, b"x-forwarded-host") == [b"127.0.0.1"]
    assert header_values(upstream, b"forwarded") == [b'for=127.0.0.1;host="127.0.0.1";proto=http']
    assert b"203.0.113.7" not in upstream and b"public.example" not in upstream


async def test_trust_is_decided_on_the_proxy_address_not_the_balancer(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The balancer (127.0.0.1) is trusted, the client it names (198.51.100.2) is not: replaced."""
    with trio.fail_after(10):
        ports, (recorder,) = await start(nursery, tmp_path, trusted=["127.0.0.0/8"])
        for listener, header in (("pp1", v1("198.51.100.2")), ("pp2", v2("198.51.100.2"))):
            upstream = await upstream_head(ports[listener], recorder, header)
            assert forwarded_for(upstream) == [b"198.51.100.2"], listener
            assert header_values(upstream, b"forwarded") == [b'for=198.51.100.2;host="127.0.0.1";proto=http']
            assert b"203.0.113.7" not in upstream


async def test_a_trusted_proxy_address_extends_the_chain(nursery: trio.Nursery, tmp_path: Path) -> None:
    """The PROXY header names a trusted proxy (an HTTP proxy behind the L4 balancer): appended to."""
    with trio.fail_after(10):
        ports, (recorder,) = await start(nursery, tmp_path, trusted=["198.51.100.0/24"])
        upstream = await upstream_head(ports["pp1"], recorder, v1("198.51.100.2"))
        assert forwarded_for(upstream) == [b"203.0.113.7, 198.51.100.2"]
        # ...while the balancer's own address, used without a header, is not trusted.
        upstream = await upstream_head(ports["plain"], recorder)
        assert forwarded_for(upstream) == [b"127.0.0.1"]
