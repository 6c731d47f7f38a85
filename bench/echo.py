"""A fast single-process WebSocket echo backend for the benchmark (RFC 6455, server side).

    python bench/echo.py --port 29000        # prints "READY port=29000" once listening
    python bench/echo.py --port 0            # the kernel picks the port; READY tells which
    python bench/echo.py --port 0 --tls-cert ec.crt --tls-key ec.key    # wss:// instead

Design: one ``select.epoll`` loop over non-blocking sockets with TCP_NODELAY, stdlib only.
Each connection performs the opening handshake, then echoes every text/binary/continuation
frame back unmasked, frame by frame and *streaming*: a frame's header is echoed as soon as
it is parsed and its payload as it arrives, so a 64 KiB frame split over several reads is
never buffered whole, and many frames in one read become one ``send``. Payload from a
client that masks with the all-zero key is forwarded as-is (no XOR work); other keys are
unmasked with one big-integer XOR per chunk. Ping is answered with pong, close with close
(same payload), then the TCP connection is closed. Protocol violations (unmasked client
frame, RSV bits, bad control frame, unknown opcode) get close 1002 and are counted.

While output is pending (the peer reads slower than it writes) the connection stops
reading, so memory per connection stays bounded by one receive. On SIGTERM/SIGINT it
prints one ``echo-stats`` line (key=value) to stderr and exits.

With ``--tls-cert/--tls-key`` every connection is TLS (the same policy as a wsproxy TLS
listener, see tlsutil.py): by default through ``tlsutil.TlsLayer`` (memory BIOs: one 256 KiB
``recv`` for many records, ciphertext out through the same ``OutBuffer``), or with
``--tls-io sock`` through a non-blocking ``ssl.SSLSocket`` (OpenSSL does the socket I/O),
kept to compare the two. A TLS connection that the echo server closes gets close_notify first.
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import ssl
import sys
import time

from outbuf import OutBuffer
from procstat import raise_nofile, tune_malloc
from tlsutil import TlsLayer, server_context
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
    parse_header,
    parse_headers,
    server_header,
    xor_mask,
)

RECV_SIZE = 256 * 1024
MAX_HEAD = 16 * 1024
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT


class Stats:
    """Counters printed on exit; ``protocol_errors`` > 0 means a client (or proxy) misbehaved."""

    def __init__(self) -> None:
        self.accepted = 0
        self.upgraded = 0
        self.bad_handshakes = 0
        self.protocol_errors = 0
        self.accept_errors = 0
        self.tls_handshakes = 0
        self.tls_errors = 0  # TLS handshake or record failures (not a peer's plain EOF)

    def line(self) -> str:
        return (
            f"echo-stats accepted={self.accepted} upgraded={self.upgraded} "
            f"bad_handshakes={self.bad_handshakes} protocol_errors={self.protocol_errors} "
            f"accept_errors={self.accept_errors} tls_handshakes={self.tls_handshakes} "
            f"tls_errors={self.tls_errors}"
        )


class EchoConn:
    """One client connection: [TLS handshake,] upgrade, then the streaming frame echo."""

    __slots__ = ("sock", "fd", "ep", "stats", "upgraded", "head", "tail", "remaining",
                 "mask", "mask_off", "out", "closing", "closed", "events", "fast_in", "fast_out", "fast_hlen",
                 "fast_total", "tls", "ssl_sock", "tls_open")

    def __init__(self, sock: socket.socket, ep: select.epoll, stats: Stats, tls: TlsLayer | None = None) -> None:
        self.sock = sock
        self.tls = tls  # TLS over memory BIOs, or None
        self.ssl_sock = isinstance(sock, ssl.SSLSocket)  # --tls-io sock: OpenSSL does the socket I/O
        self.tls_open = tls is None and not self.ssl_sock  # False until the TLS handshake is done
        self.fd = sock.fileno()
        self.ep = ep
        self.stats = stats
        self.upgraded = False
        self.head = b""  # handshake bytes received so far
        self.tail = b""  # unparsed bytes: an incomplete frame header or control frame
        self.remaining = 0  # payload bytes of the current data frame still to echo
        self.mask: bytes | None = None  # None: zero key, payload passes through
        self.mask_off = 0  # offset of the next payload byte within its frame
        self.out = OutBuffer()  # output the kernel has not accepted yet
        self.closing = False  # close once ``out`` is flushed
        self.closed = False
        self.events = EPOLLIN
        # the last zero-mask data frame header seen, for the fast path of feed_frames
        self.fast_in = b"\xff"  # its bytes as received (never matches until set)
        self.fast_out = b""  # the unmasked header to send instead
        self.fast_hlen = 0
        self.fast_total = 0  # header + payload length
        ep.register(self.fd, EPOLLIN)

    # -- events -------------------------------------------------------------------------

    def on_readable(self) -> None:
        if self.ssl_sock:
            self.sock_readable()
            return
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        if self.tls is not None:
            self.on_tls(data)
            return
        reply = self.feed_frames(data) if self.upgraded else self.feed_handshake(data)
        if reply:
            self.write(reply)

    def on_writable(self) -> None:
        if self.ssl_sock and not self.tls_open:
            self.sock_handshake()
        else:
            self.flush()

    # -- TLS through memory BIOs (the default) ----------------------------------------------

    def on_tls(self, raw: bytes) -> None:
        """``raw`` is ciphertext from the socket; replies are encrypted before ``write``."""
        tls = self.tls
        assert tls is not None
        out = b""
        try:
            if not self.tls_open:
                done, out = tls.handshake(raw)
                if not done:
                    if out:
                        self.write(out)
                    return
                self.tls_open = True
                self.stats.tls_handshakes += 1
                raw = b""  # the client's first records may already sit in the BIO
            data, eof = tls.decrypt(raw)
            if tls.out.pending:  # e.g. the answer to a key update
                out += tls.out.read()
            if data:
                reply = self.feed_frames(data) if self.upgraded else self.feed_handshake(data)
                if reply:
                    out += tls.encrypt(reply)
            if eof or self.closing:
                self.closing = True
                out += tls.close_notify()
        except ssl.SSLError:
            self.stats.tls_errors += 1
            self.close()
            return
        if out:
            self.write(out)
        elif self.closing:
            self.close()

    # -- TLS through a non-blocking ssl.SSLSocket (--tls-io sock) ---------------------------

    def sock_handshake(self) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.want(EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self.want(EPOLLOUT)
            return
        except ssl.SSLError as exc:
            if not isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                self.stats.tls_errors += 1
            self.close()
            return
        except OSError:
            self.close()
            return
        self.tls_open = True
        self.stats.tls_handshakes += 1
        self.want(EPOLLIN)
        self.sock_readable()  # records may already wait inside OpenSSL

    def sock_readable(self) -> None:
        if not self.tls_open:
            self.sock_handshake()
            return
        sock = self.sock
        parts: list[bytes] = []
        eof = False
        while True:  # until OpenSSL needs the socket again: epoll cannot see its buffer
            try:
                chunk = sock.recv(RECV_SIZE)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            except ssl.SSLError:
                self.stats.tls_errors += 1
                self.close()
                return
            except OSError:
                chunk = b""
            if not chunk:
                eof = True
                break
            parts.append(chunk)
        if parts:
            data = parts[0] if len(parts) == 1 else b"".join(parts)
            reply = self.feed_frames(data) if self.upgraded else self.feed_handshake(data)
            if reply:
                self.write(reply)
            if self.closed:
                return
        if eof or self.closing:
            self.closing = True
            if not self.out:
                self.close()

    # -- protocol -------------------------------------------------------------------------

    def feed_handshake(self, data: bytes) -> bytes:
        self.head += data
        end = self.head.find(HEADER_END)
        if end < 0:
            if len(self.head) > MAX_HEAD:
                return self.reject(b"431 Request Header Fields Too Large")
            return b""
        rest = self.head[end + 4 :]
        request_line, headers = parse_headers(self.head[:end])
        self.head = b""
        key = headers.get(b"sec-websocket-key")
        if (
            not request_line.startswith(b"GET ")
            or headers.get(b"upgrade", b"").lower() != b"websocket"
            or b"upgrade" not in headers.get(b"connection", b"").lower()
            or headers.get(b"sec-websocket-version") != b"13"
            or not key
        ):
            return self.reject(b"400 Bad Request")
        self.upgraded = True
        self.stats.upgraded += 1
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_for(key) + b"\r\n\r\n"
        )
        return response + self.feed_frames(rest) if rest else response

    def reject(self, status: bytes) -> bytes:
        self.stats.bad_handshakes += 1
        self.closing = True
        return b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    def feed_frames(self, data: bytes) -> bytes:
        """Consume ``data`` and return everything to echo for it (possibly b"")."""
        if self.closing:
            return b""
        if self.tail:
            data = self.tail + data
            self.tail = b""
        view = memoryview(data)
        end = len(data)
        pos = 0
        out: list[bytes | memoryview] = []
        while pos < end:
            if self.remaining:  # payload of the current data frame: pass it on
                k = min(self.remaining, end - pos)
                chunk = view[pos : pos + k]
                out.append(chunk if self.mask is None else xor_mask(chunk, self.mask, self.mask_off))
                self.remaining -= k
                self.mask_off += k
                pos += k
                continue
            if data.startswith(self.fast_in, pos) and pos + self.fast_total <= end:
                # a whole frame with the same header as the last one: no parsing needed
                out.append(self.fast_out)
                out.append(view[pos + self.fast_hlen : pos + self.fast_total])
                pos += self.fast_total
                continue
            header = parse_header(data, pos)
            if header is None:
                self.tail = data[pos:]
                break
            first, n, hlen, mask, rsv = header
            opcode = first & 0x0F
            if rsv or mask is None:
                out.append(self.protocol_error())
                break
            if opcode >= 0x8:
                if n > 125 or not first & 0x80:
                    out.append(self.protocol_error())
                    break
                if end - pos < hlen + n:
                    self.tail = data[pos:]
                    break
                reply = self.control(opcode, xor_mask(view[pos + hlen : pos + hlen + n], mask, 0))
                pos += hlen + n
                if reply:
                    out.append(reply)
                if self.closing:
                    break
                continue
            if opcode not in (OP_CONT, OP_TEXT, OP_BINARY):
                out.append(self.protocol_error())
                break
            out_header = server_header(first, n)
            out.append(out_header)
            if mask == ZERO_MASK:
                self.fast_in = bytes(data[pos : pos + hlen])
                self.fast_out = out_header
                self.fast_hlen, self.fast_total = hlen, hlen + n
            pos += hlen
            self.remaining = n
            self.mask = None if mask == ZERO_MASK else mask
            self.mask_off = 0
        return b"".join(out)

    def control(self, opcode: int, payload: bytes) -> bytes:
        if opcode == OP_PING:
            return server_header(0x80 | OP_PONG, len(payload)) + payload
        if opcode == OP_CLOSE:
            self.closing = True
            return server_header(0x80 | OP_CLOSE, len(payload)) + payload
        if opcode == OP_PONG:
            return b""
        return self.protocol_error()

    def protocol_error(self) -> bytes:
        self.stats.protocol_errors += 1
        self.closing = True
        return b"\x88\x02\x03\xea"  # close 1002

    # -- output -----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.out:
            self.out.append(data)
        else:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                sent = 0
            except OSError:
                self.close()
                return
            if sent < len(data):
                self.out.append(memoryview(data)[sent:])
        self.after_write()

    def flush(self) -> None:
        try:
            self.out.send_to(self.sock)
        except OSError:
            self.close()
            return
        self.after_write()

    def after_write(self) -> None:
        if self.closed:
            return
        if self.out:
            self.want(EPOLLOUT)  # backpressure: stop reading until the peer drains
        elif self.closing:
            self.close()
        else:
            self.want(EPOLLIN)

    def want(self, events: int) -> None:
        if events != self.events:
            self.events = events
            self.ep.modify(self.fd, events)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.ep.unregister(self.fd)
        except OSError:
            pass
        if self.ssl_sock and self.closing and self.tls_open and isinstance(self.sock, ssl.SSLSocket):
            try:
                self.sock.unwrap()  # close_notify (best effort, not waiting for the peer's)
            except (ssl.SSLError, OSError, ValueError):
                pass
        self.sock.close()


def listen(port: int) -> socket.socket:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lsock.bind(("127.0.0.1", port))
    lsock.listen(4096)
    lsock.setblocking(False)
    return lsock


def accept_all(lsock: socket.socket, ep: select.epoll, conns: dict[int, EchoConn], stats: Stats,
               tls_ctx: ssl.SSLContext | None = None, tls_io: str = "bio") -> bool:
    """Accept every pending connection; False if accept() failed (e.g. EMFILE)."""
    while True:
        try:
            sock, _ = lsock.accept()
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as exc:  # leave the rest in the backlog for now
            if not stats.accept_errors:
                print(f"echo: accept failed: {exc} (raise ulimit -n?)", file=sys.stderr, flush=True)
            stats.accept_errors += 1
            return False
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stats.accepted += 1
        if tls_ctx is None:
            conn = EchoConn(sock, ep, stats)
        elif tls_io == "bio":
            conn = EchoConn(sock, ep, stats, TlsLayer(tls_ctx, server_side=True))
        else:
            conn = EchoConn(tls_ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), ep, stats)
        conns[conn.fd] = conn


def serve(lsock: socket.socket, stats: Stats, tls_ctx: ssl.SSLContext | None = None, tls_io: str = "bio") -> None:
    """Run the event loop forever (until a signal raises SystemExit)."""
    ep = select.epoll()
    lfd = lsock.fileno()
    ep.register(lfd, EPOLLIN)
    conns: dict[int, EchoConn] = {}
    resume_at = 0.0  # after a failed accept(): when to listen again (0: listening)
    while True:
        if resume_at and time.monotonic() >= resume_at:
            ep.register(lfd, EPOLLIN)
            resume_at = 0.0
        timeout = max(0.0, resume_at - time.monotonic()) if resume_at else -1
        for fd, ev in ep.poll(timeout, 1024):
            if fd == lfd:
                if not accept_all(lsock, ep, conns, stats, tls_ctx, tls_io):
                    ep.unregister(lfd)  # level-triggered: would spin until an fd is free
                    resume_at = time.monotonic() + 0.1
                continue
            conn = conns.get(fd)
            if conn is None:
                continue
            if ev & EPOLLOUT:
                conn.on_writable()
            elif ev:  # EPOLLIN, EPOLLHUP or EPOLLERR: recv() tells which
                conn.on_readable()
            if conn.closed:
                del conns[fd]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--tls-cert", help="PEM certificate: serve wss:// (needs --tls-key)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-io", choices=("bio", "sock"), default="bio",
                        help="TLS through memory BIOs (default) or a non-blocking ssl.SSLSocket")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    tls_ctx = server_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    raise_nofile()
    tune_malloc()
    stats = Stats()

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    lsock = listen(args.port)
    print(f"READY port={lsock.getsockname()[1]}", flush=True)
    try:
        serve(lsock, stats, tls_ctx, args.tls_io)
    finally:
        print(stats.line(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
