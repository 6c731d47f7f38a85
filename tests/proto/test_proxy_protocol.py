"""PROXY protocol v1 and v2 headers, parsed strictly and incrementally.

v2 headers are built by ``v2()`` below, written from the HAProxy
specification's section 2.2 independently of the parser; CRC32C values are
checked against the RFC 3720 test vector first. Every valid header is fed whole
and as every one of its prefixes, as the listener will feed it read by read.
No sockets and no event loop here.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.proto.proxy_protocol import (
    MAX_V1_BYTES,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    Invalid,
    NeedMore,
    ProxyHeader,
    crc32c,
    parse,
)

HTTP_REQUEST = b"GET /chat HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\r\n"
TLS_CLIENT_HELLO = bytes.fromhex("16030100f4010000f00303") + bytes(32)

LOCAL, PROXY = 0x0, 0x1
UNSPEC, INET, INET6, UNIX = 0x0, 0x1, 0x2, 0x3
STREAM, DGRAM = 0x1, 0x2


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def v2(
    command: int = PROXY,
    family: int = INET,
    transport: int = STREAM,
    source: tuple[str, int] | None = None,
    destination: tuple[str, int] | None = None,
    tlvs: bytes = b"",
    *,
    crc: bool = False,
    version: int = 2,
) -> bytes:
    """A v2 header per PP §2.2; ``crc`` appends a PP2_TYPE_CRC32C TLV with the right checksum."""
    if family == INET6:
        source, destination = source or ("2001:db8::1", 51234), destination or ("2001:db8::7", 443)
    else:
        source, destination = source or ("192.0.2.1", 51234), destination or ("198.51.100.7", 443)
    if family == INET:
        block = (
            ipaddress.IPv4Address(source[0]).packed
            + ipaddress.IPv4Address(destination[0]).packed
            + struct.pack("!HH", source[1], destination[1])
        )
    elif family == INET6:
        block = (
            ipaddress.IPv6Address(source[0]).packed
            + ipaddress.IPv6Address(destination[0]).packed
            + struct.pack("!HH", source[1], destination[1])
        )
    elif family == UNIX:
        block = b"/run/client.sock".ljust(108, b"\0") + b"/run/wsproxy.sock".ljust(108, b"\0")
    else:
        block = b""
    body = block + tlvs + (tlv(0x03, bytes(4)) if crc else b"")
    fixed = V2_SIGNATURE + bytes([version << 4 | command, family << 4 | transport])
    header = fixed + struct.pack("!H", len(body)) + body
    if crc:
        header = header[:-4] + struct.pack("!I", crc32c(header))
    return header


def assert_every_prefix_needs_more(header: bytes, version: str) -> None:
    for end in range(len(header)):
        assert parse(header[:end], version) == NeedMore(), (end, header[:end])


def feed_byte_by_byte(data: bytes, version: str) -> NeedMore | ProxyHeader | Invalid:
    """What the listener does: grow the buffer one read at a time until a verdict."""
    buffer = b""
    verdict: NeedMore | ProxyHeader | Invalid = NeedMore()
    for byte in data:
        buffer += bytes([byte])
        verdict = parse(buffer, version)
        if not isinstance(verdict, NeedMore):
            return verdict
    return verdict


def test_crc32c_test_vector() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 §B.4 / iSCSI check value
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 §B.4: 32 bytes of zeros


# --- v1 ----------------------------------------------------------------------------------

V1_VALID = [
    (b"PROXY TCP4 192.0.2.1 198.51.100.7 51234 443\r\n", ("192.0.2.1", 51234), ("198.51.100.7", 443)),
    (b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n", ("255.255.255.255", 65535), ("0.0.0.0", 0)),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 51234 443\r\n", ("2001:db8::1", 51234), ("2001:db8::2", 443)),
    (  # canonical form out, whatever the spelling in
        b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::1 1 2\r\n",
        ("2001:db8::1", 1),
        ("::1", 2),
    ),
    (b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:198.51.100.7 1 2\r\n", ("192.0.2.1", 1), ("198.51.100.7", 2)),
    (b"PROXY UNKNOWN\r\n", None, None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None, None),  # PP §2.1: rest ignored
]


@pytest.mark.parametrize(("line", "source", "destination"), V1_VALID)
def test_v1_valid(line: bytes, source: tuple[str, int] | None, destination: tuple[str, int] | None) -> None:
    expected = ProxyHeader(source, destination, len(line))
    assert parse(line, "v1") == expected
    assert parse(line + HTTP_REQUEST, "v1") == expected  # the client's bytes follow in the same read
    assert feed_byte_by_byte(line + HTTP_REQUEST, "v1") == expected
    assert_every_prefix_needs_more(line, "v1")


def test_v1_longest_line_is_accepted() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (MAX_V1_BYTES - len(b"PROXY UNKNOWN \r\n")) + b"\r\n"
    assert len(line) == MAX_V1_BYTES
    assert parse(line, "v1") == ProxyHeader(None, None, MAX_V1_BYTES)
    assert_every_prefix_needs_more(line, "v1")


def test_v1_longest_tcp6_line_from_the_spec() -> None:
    line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    assert len(line) == 104  # PP §2.1: the worst case for TCP6
    verdict = parse(line, "v1")
    assert isinstance(verdict, ProxyHeader) and verdict.consumed == 104


def test_v1_line_without_crlf_is_invalid_once_it_cannot_end() -> None:
    long_line = b"PROXY UNKNOWN " + b"x" * 200
    assert parse(long_line[:106], "v1") == NeedMore()
    assert parse(long_line[:105] + b"\r", "v1") == NeedMore()
    assert parse(long_line[:105] + b"\r\n", "v1") == ProxyHeader(None, None, 107)
    assert isinstance(parse(long_line[:106] + b"\r", "v1"), Invalid)  # its LF would be byte 108
    for size in (107, 108, 200):
        verdict = parse(long_line[:size], "v1")
        assert verdict == Invalid("no CRLF within the first 107 bytes of a PROXY v1 line"), size


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 65536 443\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 443 99999\r\n", "destination port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 0443 443\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 00 443\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 -1 443\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 +1 443\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 0x1 443\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1000000 443\r\n", "source port"),
        (b"PROXY TCP4 256.0.2.1 198.51.100.7 1 2\r\n", "source is not an IPv4 address"),
        (b"PROXY TCP4 192.0.2 198.51.100.7 1 2\r\n", "source is not an IPv4 address"),
        (b"PROXY TCP4 192.0.2.01 198.51.100.7 1 2\r\n", "source is not an IPv4 address"),  # octal look-alike
        (b"PROXY TCP4 192.0.2.1 2001:db8::1 1 2\r\n", "destination is not an IPv4 address"),
        (b"PROXY TCP6 192.0.2.1 2001:db8::1 1 2\r\n", "source is not an IPv6 address"),
        (b"PROXY TCP6 2001:db8::g ::1 1 2\r\n", "source is not an IPv6 address"),
        (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "source is not an IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "source is not an IPv6 address"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\x00\r\n", "malformed"),
        (b"PROXY TCP4  192.0.2.1 198.51.100.7 1 2\r\n", "malformed"),  # two spaces
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2 \r\n", "malformed"),  # trailing space
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1\r\n", "malformed"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.7 1 2\n", "bare LF"),
        (b"PROXY TCP4 192.0.2.1\r198.51.100.7 1 2\r\n", "CR not followed by LF"),
        (b"PROXY TCP5 192.0.2.1 198.51.100.7 1 2\r\n", "unknown PROXY v1 protocol"),
        (b"PROXY tcp4 192.0.2.1 198.51.100.7 1 2\r\n", "unknown PROXY v1 protocol"),
        (b"PROXY UNKNOWNX\r\n", "unknown PROXY v1 protocol"),
        (b"PROXY \r\n", "unknown PROXY v1 protocol"),
        (b"proxy TCP4 192.0.2.1 198.51.100.7 1 2\r\n", "expected a PROXY protocol v1 header"),
        (b"PROXY\r\n", "expected a PROXY protocol v1 header"),
    ],
)
def test_v1_invalid(line: bytes, reason: str) -> None:
    verdict = parse(line, "v1")
    assert isinstance(verdict, Invalid), verdict
    assert reason in verdict.reason
    assert isinstance(feed_byte_by_byte(line, "v1"), Invalid)


def test_v1_garbage_is_refused_on_its_first_wrong_byte() -> None:
    assert isinstance(parse(b"G", "v1"), Invalid)
    assert isinstance(parse(b"PROXY TCP7", "v1"), Invalid)  # no need to wait for the line's end
    assert isinstance(parse(b"PROXY TCP4\r\r", "v1"), Invalid)


def test_http_request_on_a_v1_listener() -> None:
    verdict = parse(HTTP_REQUEST, "v1")
    assert verdict == Invalid("expected a PROXY protocol v1 header, got 'GET /chat HTTP/1.1\\r\\nHost'")


def test_tls_on_a_v1_listener() -> None:
    assert parse(TLS_CLIENT_HELLO, "v1") == Invalid("a TLS handshake where a PROXY protocol v1 header was expected")


def test_v2_header_on_a_v1_listener() -> None:
    assert parse(v2(), "v1") == Invalid("a PROXY protocol v2 header on a v1 listener")


# --- v2 ----------------------------------------------------------------------------------

V2_VALID = [
    (v2(), ("192.0.2.1", 51234), ("198.51.100.7", 443)),
    (
        v2(family=INET6, source=("2001:db8::1", 1), destination=("2001:db8::2", 65535)),
        ("2001:db8::1", 1),
        ("2001:db8::2", 65535),
    ),
    (v2(family=INET6, source=("::ffff:192.0.2.1", 1), destination=("::1", 2)), ("192.0.2.1", 1), ("::1", 2)),
    (v2(command=LOCAL, family=UNSPEC, transport=0), None, None),
    (v2(command=LOCAL), None, None),  # PP §2.2: LOCAL ignores the block, addresses included
    (v2(command=LOCAL, family=0xF, transport=0xF, tlvs=b"\xff"), None, None),  # ... and the family
    (v2(family=UNSPEC, transport=0), None, None),
    (v2(family=UNIX), None, None),
    (
        v2(tlvs=tlv(0x01, b"h2") + tlv(0x02, b"app.example.com") + tlv(0x04, b"") + tlv(0xE0, b"custom" * 20)),
        ("192.0.2.1", 51234),
        ("198.51.100.7", 443),
    ),
    (v2(tlvs=tlv(0x05, b"unique-id"), crc=True), ("192.0.2.1", 51234), ("198.51.100.7", 443)),
    (v2(family=INET6, source=("::1", 2), destination=("::2", 3), crc=True), ("::1", 2), ("::2", 3)),
    (v2(tlvs=tlv(0x04, bytes(MAX_V2_LENGTH - 12 - 3))), ("192.0.2.1", 51234), ("198.51.100.7", 443)),  # the longest
]


@pytest.mark.parametrize(("header", "source", "destination"), V2_VALID)
def test_v2_valid(header: bytes, source: tuple[str, int] | None, destination: tuple[str, int] | None) -> None:
    expected = ProxyHeader(source, destination, len(header))
    assert parse(header, "v2") == expected
    assert parse(header + TLS_CLIENT_HELLO, "v2") == expected
    assert feed_byte_by_byte(header + HTTP_REQUEST, "v2") == expected
    assert_every_prefix_needs_more(header, "v2")


def test_v2_length_is_refused_as_soon_as_it_is_read() -> None:
    header = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_LENGTH + 1)
    assert parse(header, "v2") == Invalid("PROXY v2 header of 1517 bytes, more than the 1516 accepted")
    assert parse(V2_SIGNATURE + b"\x21\x11\xff\xff", "v2") == Invalid(
        "PROXY v2 header of 65551 bytes, more than the 1516 accepted"
    )


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (v2(version=1), "version 1"),
        (v2(version=3), "version 3"),
        (v2(command=0x2), "unknown PROXY v2 command 0x2"),
        (v2(command=0xF), "unknown PROXY v2 command 0xf"),
        (v2(family=0x4, transport=STREAM), "unknown PROXY v2 address family"),
        (v2(family=INET, transport=0x3), "unknown PROXY v2 address family"),
        (v2(family=INET, transport=DGRAM), "datagram"),
        (v2(family=INET6, transport=DGRAM), "datagram"),
        (v2(family=UNIX, transport=DGRAM), "datagram"),
        (v2(family=INET, transport=0), "do not agree"),
        (v2(family=UNSPEC, transport=STREAM), "do not agree"),
        (V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11), "address block of 11 bytes"),
        (V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12), "address block of 12 bytes"),
        (V2_SIGNATURE + b"\x21\x31\x00\x24" + bytes(36), "address block of 36 bytes"),
        (v2(tlvs=b"\x04\x00"), "truncated PROXY v2 TLV"),
        (v2(tlvs=b"\x04"), "truncated PROXY v2 TLV"),
        (v2(tlvs=tlv(0x04, b"") + b"\x04\x00\x05abcd"), "runs past the header"),
        (v2(tlvs=tlv(0x03, b"\x00\x00\x00\x00")), "CRC32C mismatch"),
        (v2(tlvs=tlv(0x03, b"\x00\x00\x00")), "CRC32C TLV of 3 bytes"),
    ],
)
def test_v2_invalid(header: bytes, reason: str) -> None:
    verdict = parse(header, "v2")
    assert isinstance(verdict, Invalid), verdict
    assert reason in verdict.reason
    assert isinstance(feed_byte_by_byte(header, "v2"), Invalid)


def test_v2_corrupted_byte_fails_the_checksum() -> None:
    header = bytearray(v2(crc=True))
    header[17] ^= 0x01  # one bit of the source address
    verdict = parse(bytes(header), "v2")
    assert isinstance(verdict, Invalid) and "CRC32C mismatch" in verdict.reason


def test_v2_garbage_is_refused_on_its_first_wrong_byte() -> None:
    assert parse(b"\r\n\r\nX", "v2") == Invalid("expected a PROXY protocol v2 header, got '\\r\\n\\r\\nX'")
    assert isinstance(parse(V2_SIGNATURE + b"\x11", "v2"), Invalid)  # version 1 in the version nibble
    assert isinstance(parse(V2_SIGNATURE + b"\x21\x41", "v2"), Invalid)  # before the length arrives


def test_http_request_on_a_v2_listener() -> None:
    verdict = parse(HTTP_REQUEST, "v2")
    assert verdict == Invalid("expected a PROXY protocol v2 header, got 'GET /chat HTTP/1.1\\r\\nHost'")
    assert isinstance(parse(b"G", "v2"), Invalid)


def test_tls_on_a_v2_listener() -> None:
    assert parse(TLS_CLIENT_HELLO, "v2") == Invalid("a TLS handshake where a PROXY protocol v2 header was expected")


def test_v1_header_on_a_v2_listener() -> None:
    assert parse(V1_VALID[0][0], "v2") == Invalid("a PROXY protocol v1 header on a v2 listener")
    assert parse(b"P", "v2") == Invalid("a PROXY protocol v1 header on a v2 listener")


def test_version_off_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="v1"):
        parse(b"PROXY UNKNOWN\r\n", "off")


def test_empty_buffer_needs_more() -> None:
    assert parse(b"", "v1") == NeedMore()
    assert parse(b"", "v2") == NeedMore()


# --- properties ----------------------------------------------------------------------------

VERSIONS = st.sampled_from(["v1", "v2"])
PREFIXES = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY UNKNOWN", V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11"])


@given(prefix=PREFIXES, data=st.binary(max_size=2000), version=VERSIONS)
def test_random_bytes_never_raise(prefix: bytes, data: bytes, version: str) -> None:
    verdict = parse(prefix + data, version)
    assert isinstance(verdict, (NeedMore, ProxyHeader, Invalid))
    if isinstance(verdict, NeedMore):  # the listener's buffer stays bounded
        assert len(prefix + data) < (MAX_V1_BYTES if version == "v1" else 16 + MAX_V2_LENGTH)
    if isinstance(verdict, ProxyHeader):
        assert 0 < verdict.consumed <= len(prefix + data)


@given(
    source=st.ip_addresses(v=4),
    destination=st.ip_addresses(v=4),
    ports=st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
    rest=st.binary(max_size=64),
)
def test_v1_and_v2_agree(
    source: ipaddress.IPv4Address, destination: ipaddress.IPv4Address, ports: tuple[int, int], rest: bytes
) -> None:
    line = f"PROXY TCP4 {source} {destination} {ports[0]} {ports[1]}\r\n".encode()
    binary = v2(source=(str(source), ports[0]), destination=(str(destination), ports[1]))
    one, two = parse(line + rest, "v1"), parse(binary + rest, "v2")
    assert isinstance(one, ProxyHeader) and isinstance(two, ProxyHeader)
    expected = ((str(source), ports[0]), (str(destination), ports[1]))
    assert (one.source, one.destination) == (two.source, two.destination) == expected
    assert (one.consumed, two.consumed) == (len(line), len(binary))


@given(source=st.ip_addresses(v=6), port=st.integers(0, 65535), crc=st.booleans())
def test_v2_ipv6_round_trip(source: ipaddress.IPv6Address, port: int, crc: bool) -> None:
    header = v2(family=INET6, source=(str(source), port), destination=("::1", 443), crc=crc)
    verdict = parse(header, "v2")
    assert isinstance(verdict, ProxyHeader)
    expected = str(source.ipv4_mapped) if source.ipv4_mapped else str(source)
    assert verdict.source == (expected, port)
