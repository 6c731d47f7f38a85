"""``Rejection``: the verdict that refuses a request, with the reaction it calls for.

It lives apart from ``proto.handshake`` so that the modules building one
(``proto.target``, ``proto.handshake``, the gate's checks) share one class
without importing each other, and so that it stays the same class whether
``proto.handshake`` is the mypyc extension or its pure source (``wsproxy._mypyc``):
a refusal made by one build is recognised by the other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rejection:
    """Refuse the request with ``status``; ``reason`` is for the log, not the client."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()
