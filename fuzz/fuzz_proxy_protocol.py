"""Fuzz target: the PROXY protocol parser (wsproxy/proto/proxy_protocol.py ``parse``).

Input layout: one byte (bit 0: "v2", else "v1"), then the bytes received on
the connection. Invariants, all from the module's own contract:

- ``parse`` returns NeedMore, ProxyHeader or Invalid, never raises;
- it is prefix-consistent, the way the shell calls it after every read:
  every prefix shorter than a header is NeedMore, the header is found with
  the same result in any longer buffer, and once a prefix is Invalid every
  longer one is Invalid too ("refused as soon as one byte proves it wrong");
- NeedMore only while the buffer is shorter than the longest acceptable
  header (the shell's buffer is bounded by that);
- a ProxyHeader's addresses are canonical IP addresses, its ports 0..65535,
  ``consumed`` within the buffer; a v1 TCP4 line is exactly the line its
  result re-encodes to (no spelling variants pass); a v2 header's address
  block decodes to the reported addresses.
"""

from __future__ import annotations

import ipaddress
import sys

from fuzz._harness import Reader, finding, fuzz_main, instrumented

with instrumented("wsproxy"):
    from wsproxy.proto.proxy_protocol import (
        MAX_V1_BYTES,
        MAX_V2_LENGTH,
        Invalid,
        NeedMore,
        ProxyHeader,
        parse,
    )

_LIMIT = {"v1": MAX_V1_BYTES, "v2": 16 + MAX_V2_LENGTH}


def _canonical(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return False  # reported as the IPv4 address
    return str(address) == ip


def _check_header(data: bytes, version: str, header: ProxyHeader) -> None:
    if not 0 < header.consumed <= len(data):
        finding("pp-consumed", f"consumed {header.consumed} of {len(data)} bytes")
    if (header.source is None) != (header.destination is None):
        finding("pp-addresses", f"one address without the other: {header!r}")
    for address in (header.source, header.destination):
        if address is not None and (not _canonical(address[0]) or not 0 <= address[1] <= 65535):
            finding("pp-addresses", f"not a canonical address and port: {address!r}")
    if version == "v1":
        line = data[: header.consumed]
        if line.startswith(b"PROXY TCP4 ") and header.source and header.destination:
            expected = "PROXY TCP4 {} {} {} {}\r\n".format(
                header.source[0], header.destination[0], header.source[1], header.destination[1]
            ).encode()
            if line != expected:
                finding("pp-v1-spelling", f"accepted {line!r}, which re-encodes as {expected!r}")
    elif header.source is not None and header.destination is not None:
        family = data[13] >> 4
        block = data[16 : header.consumed]
        if family == 1:
            ips = [str(ipaddress.IPv4Address(block[0:4])), str(ipaddress.IPv4Address(block[4:8]))]
            ports = block[8:12]
        else:
            six = [ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])]
            ips = [str(a.ipv4_mapped or a) for a in six]
            ports = block[32:36]
        got = [header.source[0], header.destination[0]]
        if ips != got or [int.from_bytes(ports[0:2], "big"), int.from_bytes(ports[2:4], "big")] != [
            header.source[1], header.destination[1]
        ]:
            finding("pp-v2-block", f"address block {block[:36].hex()} reported as {header!r}")


def test_one_input(data: bytes) -> None:
    r = Reader(data)
    version = "v2" if r.byte() & 1 else "v1"
    buffer = r.rest()
    results = [parse(buffer[:i], version) for i in range(len(buffer) + 1)]
    for i, result in enumerate(results):
        if not isinstance(result, (NeedMore, ProxyHeader, Invalid)):
            finding("pp-type", f"parse returned {type(result).__name__}")
        if isinstance(result, NeedMore) and i >= _LIMIT[version]:
            finding("pp-unbounded", f"NeedMore with {i} bytes buffered (limit {_LIMIT[version]})")
    for i in range(1, len(results)):
        before, after = results[i - 1], results[i]
        if isinstance(before, Invalid) and not isinstance(after, Invalid):
            finding("pp-prefix", f"Invalid at {i - 1} bytes ({before.reason}) but {after!r} at {i}")
        if isinstance(before, ProxyHeader) and after != before:
            finding("pp-prefix", f"{before!r} at {i - 1} bytes but {after!r} at {i}")
        if isinstance(after, ProxyHeader) and not isinstance(before, (NeedMore, ProxyHeader)):
            finding("pp-prefix", f"{before!r} at {i - 1} bytes, then a header at {i}")
        if isinstance(after, ProxyHeader) and isinstance(before, NeedMore) and after.consumed != i:
            finding("pp-prefix", f"a header of {after.consumed} bytes first found with {i} bytes")
    final = results[-1]
    if isinstance(final, ProxyHeader):
        _check_header(buffer, version, final)


def main() -> None:
    fuzz_main(test_one_input)


if __name__ == "__main__":
    sys.exit(main())
