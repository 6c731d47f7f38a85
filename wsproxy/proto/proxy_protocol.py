"""The HAProxy PROXY protocol, versions 1 and 2, receiving side. No I/O here.

A listener with ``proxy_protocol: v1 | v2`` sits behind an L4 load balancer
that opens each connection with a PROXY header naming the client it accepted
the connection from. That address then stands for the client everywhere:
logs, per-IP limits, sticky ``ip`` keys, X-Forwarded-For, and the
``trusted_proxies`` check. This module parses the header strictly; it is not a
sender, it does not read sockets, and it interprets no TLV except the checksum.

Specification: "The PROXY protocol, Versions 1 & 2", HAProxy
``doc/proxy-protocol.txt`` (sections cited as "PP §n").

Theory of operation
-------------------

The shell keeps one buffer of everything received on the connection so far,
within the handshake timeout, and calls ``parse(buffer, version)`` after each
read::

    NeedMore                 read more and call again with the longer buffer
    ProxyHeader(src, dst, n) buffer[n:] is the start of the client's own bytes
                             (TLS or HTTP); src None = keep the TCP peer address
    Invalid(reason)          close the connection without answering: PP §2 forbids
                             guessing whether a header is there, so a listener
                             that expects one never falls back to plain HTTP

``parse`` looks only at ``data``, so calling it again from the start is the
whole state machine; the header is small enough for that to cost nothing. A
prefix of a valid header is always NeedMore, and NeedMore is only ever
returned while the buffer is shorter than the longest header this module
accepts (``MAX_V1_BYTES``, ``16 + MAX_V2_LENGTH``), so the shell's buffer is
bounded without a check of its own. Garbage is refused as soon as one byte
proves it wrong: an HTTP request, a TLS ClientHello or the other version's
header fail on their first bytes.

Decisions where the specification leaves a choice
-------------------------------------------------

* v1 ``PROXY UNKNOWN ...`` and v2 ``LOCAL`` (a balancer's own health check):
  accepted without addresses (PP §2.1, §2.2); the caller keeps the TCP peer.
  v2 ``PROXY`` with ``AF_UNSPEC`` is treated the same way.
* v2 ``AF_UNIX`` over ``STREAM``: accepted without addresses, as above:
  the header is well formed, it just carries no IP address to stand for the
  client. Any ``DGRAM`` header is Invalid: wsproxy only accepts streams, so a
  datagram header on a TCP connection means a misconfigured sender.
* v2 length: at most ``MAX_V2_LENGTH`` (1500) bytes after the 16-byte fixed
  part (the spec allows 65535); enough for addresses and the usual TLVs.
* v2 TLVs: their framing must add up exactly; their values are skipped, except
  ``PP2_TYPE_CRC32C``, which is verified when present (PP §2.2.5). The TLVs of a
  LOCAL header are not looked at: its whole block is discarded (PP §2.2).
* Addresses: IPv4 as dotted quads without leading zeros, IPv6 as
  ``ipaddress`` parses it (no zone ids); both are reported in canonical form,
  and an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) is reported as the
  IPv4 address, so per-IP state and ``trusted_proxies`` see one spelling.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["MAX_V1_BYTES", "MAX_V2_LENGTH", "V2_SIGNATURE", "Invalid", "NeedMore", "ProxyHeader", "crc32c", "parse"]

#: PP §2.1: the longest v1 line, CRLF included ("PROXY UNKNOWN" with the longest addresses).
MAX_V1_BYTES = 107
#: The most bytes accepted after the 16-byte fixed part of a v2 header.
MAX_V2_LENGTH = 1500
#: PP §2.2: the 12 bytes every v2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"

_V1_PREFIX = b"PROXY "
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")
_V1_TCP = re.compile(rb"PROXY (TCP[46]) ([!-~]+) ([!-~]+) ([!-~]+) ([!-~]+)")  # single spaces, PP §2.1
_V1_UNKNOWN = re.compile(rb"PROXY UNKNOWN(?: [^\r]*)?")  # PP §2.1: the rest of the line is ignored
_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")  # PP §2.1: no leading zeros

_CMD_LOCAL, _CMD_PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM, _DGRAM = 0x0, 0x1, 0x2
#: PP §2.2: address block size per family (byte 14, high nibble).
_ADDRESS_BYTES = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
_PP2_TYPE_CRC32C = 0x03


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The buffer is a valid prefix of a header: read more, then call ``parse`` again."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete, valid header of ``consumed`` bytes.

    ``source`` is the client's (ip, port), ``destination`` the address the
    client connected to on the balancer; both None when the header carries no
    address (v1 UNKNOWN, v2 LOCAL, AF_UNSPEC, AF_UNIX): then the TCP peer stays
    the client address.
    """

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    consumed: int


@dataclass(frozen=True, slots=True)
class Invalid:
    """Not a valid header: close the connection; ``reason`` is for the log."""

    reason: str


NEED_MORE = NeedMore()


def parse(data: bytes, version: str) -> NeedMore | ProxyHeader | Invalid:
    """Parse the PROXY header at the start of ``data`` (everything received so far).

    ``version`` is the listener's ``proxy_protocol`` setting, "v1" or "v2";
    a listener with "off" must not call this (ValueError).
    """
    if version == "v1":
        return _parse_v1(data)
    if version == "v2":
        return _parse_v2(data)
    raise ValueError(f'PROXY protocol version must be "v1" or "v2", got {version!r}')


# -- version 1: one text line ------------------------------------------------------------


def _parse_v1(data: bytes) -> NeedMore | ProxyHeader | Invalid:
    if not data.startswith(_V1_PREFIX[: len(data)]):
        return Invalid(_unexpected(data, "v1"))
    lf = data.find(b"\n", 0, MAX_V1_BYTES)
    if lf < 0:
        return _partial_v1(data)
    if data[lf - 1 : lf] != b"\r":
        return Invalid("PROXY v1 line ends in a bare LF")
    line = data[: lf - 1]
    consumed = lf + 1
    if b"\r" in line:
        return Invalid("CR not followed by LF in a PROXY v1 line")
    protocol = line[len(_V1_PREFIX) :].partition(b" ")[0]
    if protocol not in _V1_PROTOCOLS:
        return Invalid(f"unknown PROXY v1 protocol: {_show(protocol)} (TCP4, TCP6 or UNKNOWN)")
    if _V1_UNKNOWN.fullmatch(line):
        return ProxyHeader(None, None, consumed)
    match = _V1_TCP.fullmatch(line)
    if match is None:
        return Invalid(f"malformed PROXY v1 line: {_show(line)}")
    family = ipaddress.IPv4Address if match[1] == b"TCP4" else ipaddress.IPv6Address
    addresses: list[str] = []
    for what, raw in (("source", match[2]), ("destination", match[3])):
        try:
            if b"%" in raw:  # ipaddress would accept a zone id
                raise ValueError(raw)
            addresses.append(_canonical(family(raw.decode("ascii"))))
        except ValueError:
            return Invalid(f"PROXY v1 {match[1].decode()} {what} is not an {family.__name__[:4]} address: {_show(raw)}")
    ports: list[int] = []
    for what, raw in (("source", match[4]), ("destination", match[5])):
        if not _PORT.fullmatch(raw) or int(raw) > 65535:
            return Invalid(f"PROXY v1 {what} port is not 0..65535 without leading zeros: {_show(raw)}")
        ports.append(int(raw))
    return ProxyHeader((addresses[0], ports[0]), (addresses[1], ports[1]), consumed)


def _partial_v1(data: bytes) -> NeedMore | Invalid:
    """No LF yet: NeedMore if the line can still become valid."""
    if len(data) >= MAX_V1_BYTES:
        return Invalid(f"no CRLF within the first {MAX_V1_BYTES} bytes of a PROXY v1 line")
    cr = data.find(b"\r")
    if 0 <= cr < len(data) - 1:
        return Invalid("CR not followed by LF in a PROXY v1 line")
    protocol, space, _ = data[len(_V1_PREFIX) :].rstrip(b"\r").partition(b" ")
    complete = bool(space) or data.endswith(b"\r")
    if (complete and protocol not in _V1_PROTOCOLS) or not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
        return Invalid(f"unknown PROXY v1 protocol: {_show(protocol)} (TCP4, TCP6 or UNKNOWN)")
    return NEED_MORE


# -- version 2: binary ------------------------------------------------------------------


def _parse_v2(data: bytes) -> NeedMore | ProxyHeader | Invalid:
    if not data.startswith(V2_SIGNATURE[: len(data)]):
        return Invalid(_unexpected(data, "v2"))
    if len(data) < 13:
        return NEED_MORE
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        return Invalid(f"PROXY v2 signature with version {version} (expected 2)")
    if command not in (_CMD_LOCAL, _CMD_PROXY):  # PP §2.2: drop connections with other values
        return Invalid(f"unknown PROXY v2 command {command:#x}")
    if len(data) < 14:
        return NEED_MORE
    family, transport = data[13] >> 4, data[13] & 0x0F
    if command == _CMD_PROXY:
        if family not in _ADDRESS_BYTES or transport not in (_UNSPEC, _STREAM, _DGRAM):
            return Invalid(f"unknown PROXY v2 address family and transport {data[13]:#04x}")
        if transport == _DGRAM:
            return Invalid("PROXY v2 header for a datagram (DGRAM) connection on a stream listener")
        if (family == _AF_UNSPEC) != (transport == _UNSPEC):
            return Invalid(f"PROXY v2 address family and transport do not agree: {data[13]:#04x}")
    if len(data) < 16:
        return NEED_MORE
    length = int.from_bytes(data[14:16], "big")
    if length > MAX_V2_LENGTH:
        return Invalid(f"PROXY v2 header of {16 + length} bytes, more than the {16 + MAX_V2_LENGTH} accepted")
    address_bytes = _ADDRESS_BYTES[family] if command == _CMD_PROXY else 0
    if length < address_bytes:
        return Invalid(f"PROXY v2 address block of {length} bytes, family {family:#x} needs {address_bytes}")
    consumed = 16 + length
    if len(data) < consumed:
        return NEED_MORE
    if command == _CMD_LOCAL:  # PP §2.2: use the real endpoints, discard the block
        return ProxyHeader(None, None, consumed)
    header = data[:consumed]
    problem = _check_tlvs(header, 16 + address_bytes)
    if problem is not None:
        return Invalid(problem)
    block = header[16:]
    ip_source: ipaddress.IPv4Address | ipaddress.IPv6Address
    ip_destination: ipaddress.IPv4Address | ipaddress.IPv6Address
    if family == _AF_INET:
        ip_source, ip_destination = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
        ports = block[8:12]
    elif family == _AF_INET6:
        ip_source, ip_destination = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
        ports = block[32:36]
    else:  # AF_UNSPEC or AF_UNIX: no IP address to stand for the client
        return ProxyHeader(None, None, consumed)
    return ProxyHeader(
        (_canonical(ip_source), int.from_bytes(ports[0:2], "big")),
        (_canonical(ip_destination), int.from_bytes(ports[2:4], "big")),
        consumed,
    )


def _check_tlvs(header: bytes, start: int) -> str | None:
    """PP §2.2: TLVs are type (1 byte), length (2, big-endian), value; they must fill the block exactly."""
    at = start
    while at < len(header):
        if len(header) - at < 3:
            return f"truncated PROXY v2 TLV at byte {at}"
        kind, size = header[at], int.from_bytes(header[at + 1 : at + 3], "big")
        value_at = at + 3
        if value_at + size > len(header):
            return f"PROXY v2 TLV {kind:#04x} at byte {at} runs past the header ({size} bytes)"
        if kind == _PP2_TYPE_CRC32C:
            # PP §2.2.5: CRC32c of the whole header with this value zeroed; a mismatch is invalid.
            if size != 4:
                return f"PROXY v2 CRC32C TLV of {size} bytes (expected 4)"
            expected = int.from_bytes(header[value_at : value_at + 4], "big")
            actual = crc32c(header[:value_at] + bytes(4) + header[value_at + 4 :])
            if actual != expected:
                return f"PROXY v2 CRC32C mismatch: header says {expected:#010x}, computed {actual:#010x}"
        at = value_at + size
    return None


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, RFC 3720 §B.4), as PP2_TYPE_CRC32C uses it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- shared -------------------------------------------------------------------------------


def _canonical(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _unexpected(data: bytes, version: str) -> str:
    """Why ``data`` cannot start a header of ``version``, naming what it looks like."""
    if version == "v1" and data.startswith(V2_SIGNATURE[: min(len(data), 12)]):
        return "a PROXY protocol v2 header on a v1 listener"
    if version == "v2" and data.startswith(_V1_PREFIX[: min(len(data), 6)]):
        return "a PROXY protocol v1 header on a v2 listener"
    if data[:1] == b"\x16":
        return f"a TLS handshake where a PROXY protocol {version} header was expected"
    return f"expected a PROXY protocol {version} header, got {_show(data[:24])}"


def _show(raw: bytes) -> str:
    return repr(raw)[1:]
