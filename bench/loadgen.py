"""WebSocket load generator for the benchmark: several worker processes, one epoll loop each.

    python bench/loadgen.py pp50 --target 127.0.0.1:29000 [--pids 1234] [--workers 2]

prints one JSON object (see ``summarize``); exit status 3 if any error counter is non-zero.

Workloads (the ids of ../shared/bench/README.md):

    pp1    ping-pong, 1 connection, 32 B, 1 message in flight      -> p50/p99 RTT µs, msg/s
    pp50   ping-pong, 50 connections, 1 KiB, 1 in flight each        -> msg/s, p50/p99 µs
    st50   streaming, 50 connections, 1 KiB, 16 in flight each      -> msg/s
    st64k  streaming, 4 connections, 64 KiB, 8 in flight each        -> MB/s (10^6 B of payload, one way)
    conn   20 concurrent loops of connect + upgrade + close handshake + TCP close -> handshakes/s
    hold   open N idle connections, hold them H s                    -> target RSS KiB per connection

    tls-conn      as conn over TLS (wss://), a full TLS handshake each (target: ECDSA P-256 cert)
    tls-conn-rsa  the same; the runner points it at a target with an RSA 2048 certificate
    tls-pp50 / tls-st50 / tls-st64k / tls-hold   as pp50 / st50 / st64k / hold over TLS
                                                 (tls-hold: 3000 connections by default)

How it stays cheap: every worker builds its message's client frame once (binary, FIN, mask
key 00000000 so sending needs no XOR and the frame bytes are the same for every send), sends
all frames due on a connection with one ``send``, receives up to 256 KiB per ``recv``, and
verifies echoes with C-speed ``bytes.startswith`` against the prebuilt expected server frame
(with a general streaming frame parser as the fallback for re-fragmented or split frames).
Every echoed message is checked in full (length and every payload byte), and so is
``Sec-WebSocket-Accept``; the handshake key is random per connection.

TLS (tlsutil.TlsLayer): each connection gets a new ``ssl.SSLObject`` over memory BIOs after
the TCP connect, so every handshake is a full one (no session is ever reused; OP_NO_TICKET);
the certificate is not verified (CERT_NONE). Ciphertext goes through the same non-blocking
``recv``/``send``/``OutBuffer`` path as plain data.

Timing: a run is warmup + measurement window on CLOCK_MONOTONIC (shared by all processes);
only messages/handshakes completed and verified inside the window count. The parent samples
the CPU time (/proc) of the named target processes exactly at the window edges.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import ipaddress
import json
import multiprocessing as mp
import os
import resource
import select
import signal
import socket
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from outbuf import OutBuffer
from procstat import cpu_seconds, machine_busy_seconds, raise_nofile, rss_kib, tune_malloc
from tlsutil import TlsLayer, client_context
from rfc6455 import (
    HEADER_END,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    ZERO_MASK,
    accept_for,
    build_frame,
    new_key,
    parse_header,
    parse_headers,
)

RECV_SIZE = 256 * 1024
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
CLOSE_FRAME = build_frame(OP_CLOSE, b"\x03\xe8", mask=ZERO_MASK)  # close 1000, client side
PHASE_TIMEOUT_S = 10.0  # connect+upgrade, or close handshake, of one connection
ERROR_KINDS = ("open_fail", "handshake_fail", "bad_payload", "protocol", "dropped", "stalled", "timeout",
               "tls_resumed")


@dataclass(frozen=True)
class Workload:
    """One workload id and its parameters."""

    name: str
    mode: str  # "pingpong" | "stream" | "connrate" | "hold"
    conns: int  # connections (pingpong, stream, hold) or concurrent loops (connrate)
    size: int = 0  # payload bytes per message
    window: int = 1  # messages in flight per connection
    tls: bool = False  # wss://
    cert: str = "ec"  # TLS: which certificate the target must present ("ec" or "rsa"; runner's choice)


WORKLOADS: dict[str, Workload] = {
    "pp1": Workload("pp1", "pingpong", 1, 32),
    "pp50": Workload("pp50", "pingpong", 50, 1024),
    "st50": Workload("st50", "stream", 50, 1024, 16),
    "st64k": Workload("st64k", "stream", 4, 65536, 8),
    "conn": Workload("conn", "connrate", 20),
    "hold": Workload("hold", "hold", 5000),
    "tls-conn": Workload("tls-conn", "connrate", 20, tls=True),
    "tls-conn-rsa": Workload("tls-conn-rsa", "connrate", 20, tls=True, cert="rsa"),
    "tls-pp50": Workload("tls-pp50", "pingpong", 50, 1024, tls=True),
    "tls-st50": Workload("tls-st50", "stream", 50, 1024, 16, tls=True),
    "tls-st64k": Workload("tls-st64k", "stream", 4, 65536, 8, tls=True),
    "tls-hold": Workload("tls-hold", "hold", 3000, tls=True),
}
PLAIN_WORKLOADS = [name for name, wl in WORKLOADS.items() if not wl.tls]
TLS_WORKLOADS = [name for name, wl in WORKLOADS.items() if wl.tls]


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process does; its ``conns`` is its share of the workload's."""

    mode: str
    host: str
    port: int
    conns: int
    size: int
    window: int
    cpus: tuple[int, ...] | None  # CPU affinity, None = leave as is
    open_concurrency: int = 64  # hold: connection attempts in progress at once
    tls: bool = False


@dataclass
class WorkerResult:
    """What a worker reports back; counts are for the measurement window only."""

    msgs: int = 0
    handshakes: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_s: float = 0.0  # this worker's own CPU time in the window
    opened: int = 0
    open_secs: float = 0.0
    tls_resumed: int = 0  # TLS handshakes that resumed a session (should stay 0)
    tls: str = ""  # TLS version and cipher of the first connection


def payload_pattern(size: int) -> bytes:
    """The fixed message payload: bytes 0..250 repeated (a period that is not a power of 2)."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


# ---------------------------------------------------------------------------------------------
# one client connection
# ---------------------------------------------------------------------------------------------

CONNECTING, TLS_HANDSHAKE, HANDSHAKE, OPEN, CLOSING, DRAINING, DONE = range(7)


class Client:
    """A client WebSocket connection driven by its ``Worker``'s epoll loop.

    States: CONNECTING (non-blocking connect) → [wss://: TLS_HANDSHAKE] → HANDSHAKE (request
    sent, reading the 101) → OPEN → [connrate: CLOSING (close frame sent) → DRAINING (close
    received, awaiting EOF or close_notify)] → DONE (socket closed).
    """

    __slots__ = ("w", "sock", "fd", "state", "key", "head", "tail", "remaining", "fin",
                 "in_msg", "msg_off", "out", "events", "sent_ns", "done_msgs", "deadline", "tls")

    def __init__(self, worker: Worker, sock: socket.socket) -> None:
        self.w = worker
        self.sock = sock
        self.fd = sock.fileno()
        self.state = CONNECTING
        self.key = new_key()
        self.head = b""  # handshake response so far
        self.tail = b""  # unparsed bytes: an incomplete frame header or control frame
        self.remaining = 0  # payload bytes of the current data frame not yet verified
        self.fin = True  # FIN bit of the current data frame
        self.in_msg = False  # inside a (possibly fragmented) data message
        self.msg_off = 0  # payload bytes of the current message verified so far
        self.out = OutBuffer()  # output not yet accepted by the kernel
        self.events = EPOLLOUT
        self.sent_ns = 0  # pingpong: when the message in flight was sent
        self.done_msgs = 0  # messages completed in the window
        self.deadline = time.monotonic() + PHASE_TIMEOUT_S
        self.tls: TlsLayer | None = None  # wss://: set once TCP is connected

    # -- events -----------------------------------------------------------------------------

    def on_writable(self) -> None:
        if self.state == CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.w.fail(self, "open_fail")
                return
            if self.w.tls_ctx is not None:
                self.state = TLS_HANDSHAKE
                self.tls = TlsLayer(self.w.tls_ctx, server_side=False)
                self.tls_step(b"")
                return
            self.state = HANDSHAKE
            self.send(self.w.request(self.key))
        else:
            self.flush()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.w.on_eof(self)
            return
        if self.tls is not None:
            self.on_tls(data)
        elif self.state == HANDSHAKE:
            self.feed_handshake(data)
        else:
            done = self.feed_frames(data)
            if done and self.state == OPEN:
                self.w.on_messages(self, done)

    # -- TLS ----------------------------------------------------------------------------------

    def tls_step(self, raw: bytes) -> None:
        """Advance the TLS handshake with ciphertext ``raw``; then send the upgrade request."""
        tls = self.tls
        assert tls is not None
        try:
            done, out = tls.handshake(raw)
        except ssl.SSLError:
            self.w.fail(self, "handshake_fail")
            return
        if out:
            self.send_raw(out)
            if self.state == DONE:
                return
        if done:
            self.state = HANDSHAKE
            self.w.on_tls_open(self)
            self.send(self.w.request(self.key))
            if tls.inc.pending and self.state != DONE:
                self.on_tls(b"")

    def on_tls(self, raw: bytes) -> None:
        """Ciphertext ``raw`` arrived: decrypt, then handle the plaintext like plain input."""
        if self.state == TLS_HANDSHAKE:
            self.tls_step(raw)
            return
        tls = self.tls
        assert tls is not None
        try:
            data, eof = tls.decrypt(raw)
        except ssl.SSLError:
            self.w.fail(self, "protocol")
            return
        if tls.out.pending:  # e.g. the answer to a key update
            self.send_raw(tls.out.read())
        if data and self.state != DONE:
            if self.state == HANDSHAKE:
                self.feed_handshake(data)
            else:
                done = self.feed_frames(data)
                if done and self.state == OPEN:
                    self.w.on_messages(self, done)
        if eof and self.state != DONE:  # close_notify: the server is done with us
            self.w.on_eof(self)

    # -- protocol ---------------------------------------------------------------------------

    def feed_handshake(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(HEADER_END)
        if end < 0:
            if len(self.head) > 16384:
                self.w.fail(self, "handshake_fail")
            return
        status_line, headers = parse_headers(self.head[:end])
        rest = self.head[end + 4 :]
        self.head = b""
        if (
            status_line.split(b" ", 2)[1:2] != [b"101"]
            or headers.get(b"upgrade", b"").lower() != b"websocket"
            or headers.get(b"sec-websocket-accept") != accept_for(self.key)
        ):
            self.w.fail(self, "handshake_fail")
            return
        self.state = OPEN
        self.w.on_open(self)
        if rest and self.state != DONE:
            done = self.feed_frames(rest)
            if done and self.state == OPEN:
                self.w.on_messages(self, done)

    def feed_frames(self, data: bytes) -> int:
        """Verify server frames in ``data``; return the number of messages completed."""
        if self.tail:
            data = self.tail + data
            self.tail = b""
        w = self.w
        expected, elen, pattern, size = w.echo_frame, len(w.echo_frame), w.pattern, w.size
        pos, end, done = 0, len(data), 0
        while pos < end:
            if self.remaining:  # the rest of a payload that started in an earlier read
                k = min(self.remaining, end - pos)
                if self.msg_off + k > size or not data.startswith(pattern[self.msg_off : self.msg_off + k], pos):
                    w.fail(self, "bad_payload")
                    return done
                self.remaining -= k
                self.msg_off += k
                pos += k
                if not self.remaining and self.fin:
                    if not self.end_message():
                        return done
                    done += 1
                continue
            if not self.in_msg and data.startswith(expected, pos):  # fast path: a whole echo
                done += 1
                pos += elen
                continue
            header = parse_header(data, pos)
            if header is None:
                self.tail = data[pos:]
                break
            first, n, hlen, mask, rsv = header
            opcode = first & 0x0F
            if mask is not None or rsv:
                w.fail(self, "protocol")
                return done
            if opcode >= 0x8:
                if end - pos < hlen + n:
                    self.tail = data[pos:]
                    break
                self.control(opcode, data[pos + hlen : pos + hlen + n])
                pos += hlen + n
                if self.state == DONE:
                    return done
                continue
            if (opcode == OP_CONT) != self.in_msg or opcode not in (OP_CONT, OP_TEXT, OP_BINARY):
                w.fail(self, "protocol")
                return done
            self.in_msg = True
            self.fin = bool(first & 0x80)
            self.remaining = n
            pos += hlen
            if not n and self.fin:
                if not self.end_message():
                    return done
                done += 1
        return done

    def end_message(self) -> bool:
        if self.msg_off != self.w.size:
            self.w.fail(self, "bad_payload")
            return False
        self.msg_off = 0
        self.in_msg = False
        return True

    def control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.send(build_frame(OP_PONG, payload, mask=ZERO_MASK))
        elif opcode == OP_CLOSE:
            self.w.on_close_frame(self)
        elif opcode != OP_PONG:
            self.w.fail(self, "protocol")

    # -- output -----------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            data = self.tls.encrypt(data)
        self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        if self.out:
            self.out.append(data)
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.w.on_eof(self)
            return
        if sent < len(data):
            self.out.append(memoryview(data)[sent:])
            self.want(EPOLLIN | EPOLLOUT)
        else:
            self.want(EPOLLIN)

    def flush(self) -> None:
        try:
            self.out.send_to(self.sock)
        except OSError:
            self.w.on_eof(self)
            return
        if not self.out:
            self.want(EPOLLIN)

    def want(self, events: int) -> None:
        if events != self.events and self.state != DONE:
            self.events = events
            self.w.ep.modify(self.fd, events)

    def close(self) -> None:
        if self.state != DONE:
            self.state = DONE
            try:
                self.w.ep.unregister(self.fd)
            except OSError:
                pass
            self.sock.close()


# ---------------------------------------------------------------------------------------------
# one worker process
# ---------------------------------------------------------------------------------------------


class Worker:
    """The event loop of one worker process and the per-mode reactions to client events."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.mode = spec.mode
        self.ep = select.epoll()
        self.clients: dict[int, Client] = {}
        self.opening = 0  # clients in CONNECTING or HANDSHAKE
        self.size = spec.size
        self.pattern = payload_pattern(spec.size)
        self.frame = build_frame(OP_BINARY, self.pattern, mask=ZERO_MASK)
        self.window_frames = self.frame * spec.window
        self.echo_frame = build_frame(OP_BINARY, self.pattern, mask=None)
        self.tls_ctx = client_context() if spec.tls else None
        self._request = (
            f"GET / HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        ).encode()
        self.result = WorkerResult()
        self.win_start_ns = self.win_end_ns = 0  # 0: not measuring yet
        self.loading = False  # generating load (after "go", before the window's end)
        self.finished = False  # the window is over: errors while closing do not count
        self.wake_fd = -1  # hold: the parent's pipe, which ends the hold
        self.woken = False
        self.next_timeout_check = 0.0

    def request(self, key: bytes) -> bytes:
        return self._request + key + b"\r\n\r\n"

    # -- connection management --------------------------------------------------------------

    def open_client(self) -> None:
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            self.result.errors["open_fail"] += 1
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((self.spec.host, self.spec.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.result.errors["open_fail"] += 1
            return
        client = Client(self, sock)
        self.clients[client.fd] = client
        self.opening += 1
        self.ep.register(client.fd, EPOLLOUT)

    def drop(self, c: Client) -> None:
        if c.state <= HANDSHAKE:
            self.opening -= 1
        c.close()
        self.clients.pop(c.fd, None)
        if self.loading and self.mode == "connrate":
            self.open_client()  # keep the loop count constant

    def fail(self, c: Client, kind: str) -> None:
        if not self.finished:
            self.result.errors[kind] += 1
        self.drop(c)

    def in_window(self, now_ns: int) -> bool:
        return self.win_start_ns <= now_ns < self.win_end_ns

    # -- reactions to client events -----------------------------------------------------------

    def on_tls_open(self, c: Client) -> None:
        assert c.tls is not None
        if c.tls.obj.session_reused:
            self.result.tls_resumed += 1
        if not self.result.tls:
            self.result.tls = c.tls.describe()

    def on_open(self, c: Client) -> None:
        self.opening -= 1
        self.result.opened += 1
        if self.mode == "connrate":
            c.state = CLOSING
            c.deadline = time.monotonic() + PHASE_TIMEOUT_S
            c.send(CLOSE_FRAME)
        elif self.loading:
            self.start_sending(c)

    def start_sending(self, c: Client) -> None:
        c.sent_ns = time.monotonic_ns()
        c.send(self.window_frames)

    def on_messages(self, c: Client, n: int) -> None:
        now = time.monotonic_ns()
        if self.win_start_ns <= now < self.win_end_ns:
            self.result.msgs += n
            c.done_msgs += n
            if self.mode == "pingpong":
                self.result.latencies_ns.append(now - c.sent_ns)
        if not self.loading:
            return
        if self.mode == "pingpong":
            c.sent_ns = time.monotonic_ns()
            c.send(self.frame)
        else:
            c.send(self.frame * n)

    def on_close_frame(self, c: Client) -> None:
        if c.state == CLOSING:
            c.state = DRAINING  # the server answered our close; it closes TCP next
        else:
            self.fail(c, "dropped")

    def on_eof(self, c: Client) -> None:
        if c.state == DRAINING:
            if self.in_window(time.monotonic_ns()):
                self.result.handshakes += 1
            self.drop(c)
        elif c.state != DONE:
            self.fail(c, "open_fail" if c.state <= HANDSHAKE else "dropped")

    # -- the loop -----------------------------------------------------------------------------

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for events and dispatch them; expire slow connections."""
        clients = self.clients
        for fd, ev in self.ep.poll(timeout, 1024):
            c = clients.get(fd)
            if c is None:
                if fd == self.wake_fd:
                    self.woken = True
                continue
            if c.state == CONNECTING or ev & EPOLLOUT:
                c.on_writable()
            if ev & ~EPOLLOUT and c.state not in (CONNECTING, DONE):
                c.on_readable()
        now = time.monotonic()
        if now >= self.next_timeout_check:
            self.next_timeout_check = now + 0.2
            self.expire(now)

    def expire(self, now: float) -> None:
        for c in list(self.clients.values()):
            if c.state in (CONNECTING, TLS_HANDSHAKE, HANDSHAKE, CLOSING, DRAINING) and now > c.deadline:
                self.fail(c, "timeout")

    def run_until(self, deadline: float) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.poll(min(left, 0.2))

    def open_all(self, n: int, concurrency: int, timeout: float) -> None:
        """Open ``n`` connections, at most ``concurrency`` in progress at once.

        Gives up early once more than 32 + 1 % of them failed (the target is overloaded or out
        of file descriptors: waiting for the rest would only add timeouts).
        """
        t0 = time.monotonic()
        to_open = n
        give_up = 32 + n // 100
        while time.monotonic() - t0 < timeout:
            if sum(self.result.errors.values()) > give_up:
                for c in [c for c in self.clients.values() if c.state <= HANDSHAKE]:
                    self.fail(c, "open_fail")
                break
            while to_open and self.opening < concurrency:
                self.open_client()
                to_open -= 1
            if not to_open and not self.opening:
                break
            self.poll(0.2)
        self.result.open_secs = time.monotonic() - t0

    # -- the phases ---------------------------------------------------------------------------

    def run_load(self, start_ns: int, end_ns: int) -> None:
        """Warm up until ``start_ns``, then measure until ``end_ns`` (CLOCK_MONOTONIC)."""
        self.loading = True
        if self.mode == "connrate":
            for _ in range(self.spec.conns):
                self.open_client()
        else:
            for c in list(self.clients.values()):
                self.start_sending(c)
        self.win_start_ns, self.win_end_ns = start_ns, end_ns
        self.run_until(start_ns / 1e9)
        cpu0 = own_cpu_seconds()
        self.run_until(end_ns / 1e9)
        self.result.cpu_s = own_cpu_seconds() - cpu0
        self.loading = False
        self.finished = True
        if self.mode in ("pingpong", "stream"):
            stalled = sum(1 for c in self.clients.values() if c.state == OPEN and not c.done_msgs)
            self.result.errors["stalled"] += stalled

    def run_hold(self, pipe: Connection, open_timeout: float) -> None:
        """Open every connection, report, then idle until the parent says stop."""
        self.open_all(self.spec.conns, self.spec.open_concurrency, open_timeout)
        pipe.send(("open", self.result.opened, self.result.open_secs))
        self.wake_fd = pipe.fileno()
        self.ep.register(self.wake_fd, EPOLLIN)
        while not self.woken:
            self.poll(0.2)
        self.finished = True
        pipe.recv()

    def close_all(self) -> None:
        for c in list(self.clients.values()):
            c.close()
        self.clients.clear()


def die_with_parent() -> None:
    """Get SIGTERM when the parent dies (PR_SET_PDEATHSIG), so no worker outlives a killed run."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker_main(pipe: Connection, spec: WorkerSpec, open_timeout: float) -> None:
    """Entry point of a worker process: ready → go → load (or hold) → result."""
    try:
        raise_nofile()
        tune_malloc()
        die_with_parent()
        if spec.cpus:
            os.sched_setaffinity(0, spec.cpus)
        worker = Worker(spec)
        if spec.mode in ("pingpong", "stream"):
            worker.open_all(spec.conns, spec.conns, open_timeout)
        pipe.send(("ready", worker.result.opened))
        cmd = pipe.recv()
        if cmd[0] != "go":
            return
        if spec.mode == "hold":
            worker.run_hold(pipe, open_timeout)
        else:
            worker.run_load(cmd[1], cmd[2])
        worker.close_all()
        pipe.send(("result", worker.result))
    except (KeyboardInterrupt, BrokenPipeError, EOFError):
        pass


# ---------------------------------------------------------------------------------------------
# the parent: start workers, time the window, sample the target, merge
# ---------------------------------------------------------------------------------------------


@dataclass
class Options:
    """How to run one measurement."""

    host: str
    port: int
    workers: int = 2
    duration: float = 3.0
    warmup: float = 0.5
    cpus: tuple[int, ...] | None = None  # affinity of the worker processes
    cpu_pids: dict[str, list[int]] = field(default_factory=dict)  # name -> PIDs to sample CPU of
    rss_pids: list[int] = field(default_factory=list)  # hold: PIDs whose RSS is measured
    hold_n: int | None = None  # hold: connections to open (None: the workload's own count)
    hold_secs: float = 3.0


def hold_count(wl: Workload, opt: Options) -> int:
    return wl.conns if opt.hold_n is None else opt.hold_n


def split(total: int, parts: int) -> list[int]:
    """``total`` spread over at most ``parts`` non-empty shares."""
    shares = [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
    return [s for s in shares if s]


class Fleet:
    """The worker processes of one measurement and their pipes."""

    def __init__(self, wl: Workload, opt: Options) -> None:
        conns = hold_count(wl, opt) if wl.mode == "hold" else wl.conns
        self.open_timeout = max(30.0, conns / 100)
        ctx = mp.get_context("fork")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for share in split(conns, opt.workers):
            spec = WorkerSpec(wl.mode, opt.host, opt.port, share, wl.size, wl.window, opt.cpus, tls=wl.tls)
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child_end, spec, self.open_timeout), daemon=True)
            proc.start()
            child_end.close()
            self.pipes.append(parent_end)
            self.procs.append(proc)

    def gather(self, tag: str, timeout: float) -> list[tuple[Any, ...]]:
        """One message tagged ``tag`` from every worker."""
        replies: dict[int, tuple[Any, ...]] = {}
        deadline = time.monotonic() + timeout
        while len(replies) < len(self.pipes):
            left = deadline - time.monotonic()
            ready = wait([p for i, p in enumerate(self.pipes) if i not in replies], max(left, 0))
            if not ready:
                raise RuntimeError(f"load generator workers did not report {tag!r} within {timeout:.0f}s")
            for p in ready:
                assert isinstance(p, Connection)
                i = self.pipes.index(p)
                try:
                    msg = p.recv()
                except EOFError:
                    raise RuntimeError("a load generator worker died (see its traceback above)") from None
                if msg[0] != tag:
                    raise RuntimeError(f"worker {i} sent {msg[0]!r}, expected {tag!r}")
                replies[i] = msg
        return [replies[i] for i in range(len(self.pipes))]

    def broadcast(self, *msg: Any) -> None:
        for p in self.pipes:
            p.send(msg)

    def stop(self) -> None:
        """Tell workers that still wait for a command to quit, then reap them all."""
        for p in self.pipes:
            try:
                p.send(("stop",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for p in self.pipes:
            p.close()


def sleep_until_ns(t_ns: int) -> None:
    left = (t_ns - time.monotonic_ns()) / 1e9
    if left > 0:
        time.sleep(left)


def sample_cpu(opt: Options) -> dict[str, float]:
    """CPU seconds so far of each named PID group, and of the whole machine ("machine")."""
    sample = {name: cpu_seconds(pids) for name, pids in opt.cpu_pids.items()}
    sample["machine"] = machine_busy_seconds()
    return sample


def measure(wl: Workload, opt: Options) -> dict[str, Any]:
    """Run workload ``wl`` against ``opt.host:opt.port`` once and summarize it."""
    fleet = Fleet(wl, opt)
    try:
        ready = fleet.gather("ready", fleet.open_timeout + 10)
        if wl.mode == "hold":
            return measure_hold(wl, opt, fleet)
        start_ns = time.monotonic_ns() + int(opt.warmup * 1e9)
        end_ns = start_ns + int(opt.duration * 1e9)
        fleet.broadcast("go", start_ns, end_ns)
        sleep_until_ns(start_ns)
        cpu0 = sample_cpu(opt)
        sleep_until_ns(end_ns)
        cpu1 = sample_cpu(opt)
        results = [r[1] for r in fleet.gather("result", 30)]
        summary = summarize(wl, opt, results)
        summary["opened"] = sum(r[1] for r in ready)
        summary["cpu_s"] = {k: round(cpu1[k] - cpu0[k], 3) for k in cpu0}
        return summary
    finally:
        fleet.stop()


def measure_hold(wl: Workload, opt: Options, fleet: Fleet) -> dict[str, Any]:
    """hold: RSS before opening, then (max) while all connections are held."""
    rss_before = rss_kib(opt.rss_pids)
    fleet.broadcast("go", 0, 0)
    opened_msgs = fleet.gather("open", fleet.open_timeout + 10)
    opened = sum(m[1] for m in opened_msgs)
    open_secs = max(m[2] for m in opened_msgs)
    rss_during = 0
    t_end = time.monotonic() + opt.hold_secs
    while True:
        rss_during = max(rss_during, rss_kib(opt.rss_pids))
        if time.monotonic() >= t_end:
            break
        time.sleep(min(0.25, max(0.0, t_end - time.monotonic())))
    fleet.broadcast("stop")
    results = [r[1] for r in fleet.gather("result", 60)]
    summary = summarize(wl, opt, results)
    summary.update(
        opened=opened,
        open_secs=round(open_secs, 3),
        rss_before_kib=rss_before,
        rss_during_kib=rss_during,
        kib_per_conn=round((rss_during - rss_before) / opened, 2) if opened and opt.rss_pids else None,
    )
    if opened < hold_count(wl, opt) and not summary["errors"]:
        summary["errors"]["open_fail"] = hold_count(wl, opt) - opened
    return summary


def percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(wl: Workload, opt: Options, results: list[WorkerResult]) -> dict[str, Any]:
    """Merge worker results into the figures of one run (rates per second of the window)."""
    msgs = sum(r.msgs for r in results)
    handshakes = sum(r.handshakes for r in results)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    lat = sorted(x for r in results for x in r.latencies_ns)
    out: dict[str, Any] = {
        "workload": wl.name,
        "workers": len(results),
        "duration_s": opt.duration,
        "msgs": msgs,
        "msgs_per_s": round(msgs / opt.duration, 1),
        "mb_per_s": round(msgs * wl.size / opt.duration / 1e6, 2),
        "handshakes": handshakes,
        "hs_per_s": round(handshakes / opt.duration, 1),
        "loadgen_cpu_s": round(sum(r.cpu_s for r in results), 3),
        "errors": {k: errors[k] for k in ERROR_KINDS if errors[k]},
    }
    if wl.tls:
        out["tls"] = next((r.tls for r in results if r.tls), "")
        out["tls_resumed"] = sum(r.tls_resumed for r in results)
        if out["tls_resumed"]:  # every handshake must be a full one
            out["errors"]["tls_resumed"] = out["tls_resumed"]
    if lat:
        out.update(
            p50_us=round(percentile(lat, 0.50) / 1e3, 1),
            p99_us=round(percentile(lat, 0.99) / 1e3, 1),
            max_us=round(lat[-1] / 1e3, 1),
        )
    return out


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def loopback_target(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``; only loopback addresses are allowed."""
    host, _, port = text.rpartition(":")
    if not ipaddress.ip_address(host).is_loopback:
        raise argparse.ArgumentTypeError(f"only loopback targets are allowed, got {host}")
    return host, int(port)


def pid_list(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="WebSocket load generator (one workload, JSON out)")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--target", type=loopback_target, required=True, help="127.0.0.1:PORT")
    parser.add_argument("--pids", type=pid_list, default=[], help="PID[,PID..] whose CPU/RSS to sample")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--cpus", type=pid_list, default=None, help="pin workers to these CPUs, e.g. 1")
    parser.add_argument("--hold-n", type=int, default=None, help="hold: connections (default 5000, tls-hold 3000)")
    parser.add_argument("--hold-secs", type=float, default=3.0)
    args = parser.parse_args(argv)
    raise_nofile()
    opt = Options(
        host=args.target[0], port=args.target[1], workers=args.workers, duration=args.duration,
        warmup=args.warmup, cpus=tuple(args.cpus) if args.cpus else None,
        cpu_pids={"target": args.pids} if args.pids else {}, rss_pids=args.pids,
        hold_n=args.hold_n, hold_secs=args.hold_secs,
    )
    summary = measure(WORKLOADS[args.workload], opt)
    print(json.dumps(summary), flush=True)
    return 3 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
