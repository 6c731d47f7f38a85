"""Reading the downstream request and answering refusals (trio shell).

``read_request`` reads the request head within the session's handshake
deadline and runs the sans-I/O checks of ``proto.handshake`` on it; what it
refuses is answered, logged and counted by ``edge.refusal.refuse``, which
sends the response with ``send_final``: it closes gently so the client can
read it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import h11
import trio

from ..proto.handshake import (
    Rejection,
    RequestHead,
    Upgrade,
    check_raw_head,
    check_upgrade,
    h11_reason,
    parse_request_head,
)
from .channel import ChannelBroken, RawChannel

log = logging.getLogger("wsproxy.edge.session")

#: How long a final response (or a closing session) may take to go out.
CLOSE_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Silent:
    """A refusal without an answer: the client sent nothing before the deadline (no 408; closed)."""

    reason: str


async def send_final(client: RawChannel, data: bytes) -> None:
    """Send a final response, half-close, and let the client read it before the socket goes.

    Closing at once with unread request bytes in the kernel buffer would send
    a reset that can destroy the response in flight (RFC 7230 §6.6).
    """
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await client.send(data)
        except ChannelBroken:
            return
        client.send_eof()
        while await client.receive():
            pass


def _head(buf: bytearray, limit: int) -> bytes | Rejection | None:
    """The request head once ``buf`` holds all of it, a Rejection for a head that cannot be one, else None."""
    end = buf.find(b"\r\n\r\n")
    if end >= 0:
        return bytes(buf[: end + 4])
    if len(buf) > limit:
        return Rejection(431, f"request head over {limit} bytes")
    if buf.count(b"\n") != buf.count(b"\r\n"):
        return Rejection(400, "bare LF line ending in the request")
    return None


async def read_request(
    client: RawChannel, *, deadline: float, handshake_s: float, limit: int
) -> tuple[Upgrade, bytes] | Rejection | Silent | None:
    """The client's upgrade and the bytes after its head, or a Rejection to answer.

    Returns ``Silent`` when the client sent nothing before the deadline (a
    connection that never spoke gets no 408; it is closed), None when it went
    away.
    """
    buf = bytearray()
    # The request is usually whole in the kernel by the time the connection is accepted:
    # then it is read without a wait, and without entering the deadline's cancel scope.
    first = client.receive_ready() if type(client) is RawChannel else None
    if first == b"":
        return None
    head: bytes | Rejection | None = None
    if first is not None:
        buf += first
        head = _head(buf, limit)
    if head is None:
        with trio.move_on_at(deadline) as scope:
            while head is None:
                data = await client.receive()
                if not data:
                    return None
                buf += data
                head = _head(buf, limit)
        if scope.cancelled_caught:
            if buf:
                return Rejection(408, f"request not complete within {handshake_s:g}s")
            return Silent(f"no request within {handshake_s:g}s")
    if isinstance(head, Rejection):
        return head
    assert head is not None
    if len(head) > limit:
        return Rejection(431, f"request head over {limit} bytes")
    rejection = check_raw_head(head)
    if rejection is not None:
        return rejection
    event: h11.Request | RequestHead | None = parse_request_head(head)  # the common shape, without h11
    if event is None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
        conn.receive_data(head)
        try:
            parsed = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return Rejection(exc.error_status_hint, h11_reason(exc))  # h11's own message quotes the line
        if not isinstance(parsed, h11.Request):  # pragma: no cover - h11 has the whole head
            return Rejection(400, "malformed request")
        event = parsed
    verdict = check_upgrade(event)
    if isinstance(verdict, Rejection):
        return verdict
    return verdict, bytes(buf[len(head) :])
