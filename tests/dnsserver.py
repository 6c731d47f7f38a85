"""A small authoritative DNS server on loopback for the discovery tests (dnslib, UDP and TCP).

It answers A, AAAA and SRV questions from a table the test changes while it
runs (``set``), with the TTL the test gives, and can be told to fail:
``mode = "servfail"`` answers SERVFAIL, ``"drop"`` answers nothing (the
resolver times out). Over UDP an answer larger than 512 bytes is sent
truncated (TC set, question kept, no records), as RFC 1035 §4.2.1 servers
do, so the resolver must retry over TCP. Every query is recorded (name,
type, protocol, time) for the tests that check TTLs and the TCP fallback.

Both servers run in daemon threads (socketserver), on one port chosen by the
kernel; ``stop`` shuts them down.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A, DNSRecord  # type: ignore[import-untyped]
from dnslib.server import BaseResolver, DNSHandler, DNSLogger, DNSServer  # type: ignore[import-untyped]

UDP_MAX_BYTES = 512


@dataclass
class Query:
    name: str
    type: str
    protocol: str  # "udp" | "tcp"
    at: float  # time.monotonic()


@dataclass
class Srv:
    priority: int
    weight: int
    port: int
    target: str
    address: str | None = "127.0.0.1"  # sent in the additional section; None: the client must ask for it


class _Quiet(DNSLogger):
    def __init__(self) -> None:
        super().__init__(log="-request,-reply,-truncated,-error,-recv,-send,-data")

    def log_error(self, handler: Any, e: Any) -> None:
        pass


class _Drop(Exception):
    pass


class _Handler(DNSHandler):
    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        table: DnsTable = self.server.resolver  # type: ignore[attr-defined]
        reply = table.answer(request, self.protocol)
        if reply is None:
            raise _Drop  # nothing is sent: the resolver times out
        packed: bytes = reply.pack()
        if self.protocol == "udp" and len(packed) > UDP_MAX_BYTES:
            truncated = request.reply()
            truncated.header.tc = 1
            packed = truncated.pack()
        return packed

    def handle(self) -> None:
        try:
            super().handle()
        except Exception:  # "drop", or a client that went away
            pass


@dataclass
class DnsTable(BaseResolver):  # type: ignore[misc]
    """What the server answers: ``records[(name, type)]``; names without the final dot, lower case."""

    ttl: int = 1
    mode: str = "answer"  # answer | servfail | drop
    records: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    queries: list[Query] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, name: str, kind: str, values: list[Any]) -> None:
        """Answer ``kind`` questions for ``name`` with ``values`` (IP strings, or ``Srv``) from now on."""
        with self.lock:
            self.records[(name.lower().rstrip("."), kind)] = list(values)

    def count(self, name: str, kind: str, protocol: str | None = None) -> int:
        with self.lock:
            return sum(
                1 for q in self.queries
                if q.name == name and q.type == kind and (protocol is None or q.protocol == protocol)
            )

    def times(self, name: str, kind: str) -> list[float]:
        with self.lock:
            return [q.at for q in self.queries if q.name == name and q.type == kind and q.protocol == "udp"]

    def answer(self, request: DNSRecord, protocol: str) -> DNSRecord | None:
        question = request.q
        name = str(question.qname).lower().rstrip(".")
        kind = QTYPE[question.qtype]
        with self.lock:
            self.queries.append(Query(name, kind, protocol, time.monotonic()))
            mode, ttl = self.mode, self.ttl
            values = list(self.records.get((name, kind), []))
            known = any(n == name for n, _ in self.records)
        if mode == "drop":
            return None
        reply = request.reply()
        reply.header.aa = 1
        if mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if not values and not known:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for value in values:
            if isinstance(value, Srv):
                reply.add_answer(RR(question.qname, QTYPE.SRV, ttl=ttl, rdata=SRV(value.priority, value.weight, value.port, value.target + ".")))
                if value.address is not None:
                    reply.add_ar(RR(value.target + ".", QTYPE.A, ttl=ttl, rdata=A(value.address)))
            elif kind == "AAAA":
                reply.add_answer(RR(question.qname, QTYPE.AAAA, ttl=ttl, rdata=AAAA(value)))
            else:
                reply.add_answer(RR(question.qname, QTYPE.A, ttl=ttl, rdata=A(value)))
        return reply


class DnsServer:
    """``DnsTable`` served on 127.0.0.1, UDP and TCP on the same port."""

    def __init__(self, table: DnsTable | None = None) -> None:
        self.table = table or DnsTable()
        for attempt in range(20):  # the kernel picks the UDP port; TCP may hold it already
            self._udp = DNSServer(self.table, port=0, address="127.0.0.1", handler=_Handler, logger=_Quiet())
            self.port = int(self._udp.server.server_address[1])
            try:
                self._tcp = DNSServer(
                    self.table, port=self.port, address="127.0.0.1", tcp=True, handler=_Handler, logger=_Quiet()
                )
                break
            except OSError:
                self._udp.server.server_close()
                if attempt == 19:
                    raise
        self._udp.start_thread()
        self._tcp.start_thread()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            server.server.shutdown()
            server.server.server_close()
