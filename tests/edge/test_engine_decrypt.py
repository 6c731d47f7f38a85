"""``edge.engine._decrypt``: every whole record the incoming BIO holds, and whether the TLS stream ended.

Two real ``ssl.SSLObject`` ends (certificates from trustme) talk through
memory BIOs; the engine's side is a real ``TlsChannel`` on a socketpair
socket it never uses here. The cases are the ones the engine meets on a
read: records, a record cut in two, close_notify, a TCP EOF, records and EOF
in one read.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import pytest

from tests.kit.tls import Pki, pki  # noqa: F401 - pki is a fixture
from wsproxy.edge.engine import _decrypt
from wsproxy.edge.tls import TlsChannel


class Peer:
    """The other end: an SSLObject whose records the test hands to the engine's side by hand."""

    def __init__(self, ssl_object: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
        self.ssl, self.incoming, self.outgoing = ssl_object, incoming, outgoing


@pytest.fixture
def ends(pki: Pki) -> Iterator[tuple[TlsChannel, Peer]]:  # noqa: F811
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.cert_pem, pki.key_pem)
    mine, unused = socket.socketpair()
    ours = TlsChannel.wrap_client(mine, pki.client_context(), "localhost")
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = Peer(server_ctx.wrap_bio(incoming, outgoing, server_side=True), incoming, outgoing)
    for _ in range(10):  # the handshake, through the BIOs
        for side in (ours.ssl, peer.ssl):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        peer.incoming.write(ours.outgoing.read())
        ours.incoming.write(peer.outgoing.read())
    ours.ssl.do_handshake()
    try:
        yield ours, peer
    finally:
        mine.close()
        unused.close()


def records(peer: Peer, *messages: bytes) -> bytes:
    for message in messages:
        peer.ssl.write(message)
    return peer.outgoing.read()


def test_every_whole_record_is_decrypted_at_once(ends: tuple[TlsChannel, Peer]) -> None:
    ours, peer = ends
    _decrypt(ours)  # the TLS 1.3 tickets that came after the handshake
    ours.incoming.write(records(peer, b"one", b"two", b"three"))
    assert _decrypt(ours) == (b"onetwothree", False)
    assert _decrypt(ours) == (b"", False)  # nothing more, and not ended


def test_a_record_cut_in_two_waits_for_its_second_half(ends: tuple[TlsChannel, Peer]) -> None:
    ours, peer = ends
    _decrypt(ours)
    wire = records(peer, b"first", b"x" * 3000)
    cut = len(wire) - 100
    ours.incoming.write(wire[:cut])
    assert _decrypt(ours) == (b"first", False)
    ours.incoming.write(wire[cut:])
    assert _decrypt(ours) == (b"x" * 3000, False)


def test_close_notify_ends_the_stream(ends: tuple[TlsChannel, Peer]) -> None:
    ours, peer = ends
    _decrypt(ours)
    peer.ssl.write(b"last")
    try:
        peer.ssl.unwrap()
    except ssl.SSLWantReadError:  # it waits for our close_notify; its own is in outgoing
        pass
    ours.incoming.write(peer.outgoing.read())
    assert _decrypt(ours) == (b"last", True)


def test_records_then_a_tcp_eof_in_one_read_end_the_stream_after_the_records(ends: tuple[TlsChannel, Peer]) -> None:
    """The records are returned and the end is seen in the same call (no read left to find it later)."""
    ours, peer = ends
    _decrypt(ours)
    ours.incoming.write(records(peer, b"a", b"b"))
    ours.incoming.write_eof()
    assert _decrypt(ours) == (b"ab", True)


def test_a_tcp_eof_alone_ends_the_stream(ends: tuple[TlsChannel, Peer]) -> None:
    ours, _ = ends
    _decrypt(ours)
    ours.incoming.write_eof()
    assert _decrypt(ours) == (b"", True)
