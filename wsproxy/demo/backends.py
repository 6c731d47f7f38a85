"""Demo echo backends: small trio-websocket servers that ``make demo`` runs behind the proxy.

Not part of the proxy: they exist so that a newcomer has something real to
proxy to. Each echo backend greets a new connection with its name (so the
balancing is visible) and then echoes every message unchanged. The chat
backends and the chat page are in ``chat.py``.
"""

from __future__ import annotations

import logging

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

log = logging.getLogger("wsproxy.demo.backends")


def echo_backend(name: str):  # type: ignore[no-untyped-def]
    """A request handler that greets with ``name`` and echoes."""

    async def handler(request: WebSocketRequest) -> None:
        offered = request.proposed_subprotocols
        ws = await request.accept(subprotocol=offered[0] if offered else None)
        if request.path == "/healthz":  # wsproxy's health check: answer its ping, say nothing
            try:
                await ws.get_message()
            except ConnectionClosed:
                pass
            return
        log.info("event=open backend=%s path=%s", name, request.path)
        try:
            await ws.send_message(f"{name}: connected; send anything and it comes back")
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed as exc:
            reason = exc.reason
            log.info("event=close backend=%s code=%s", name, reason.code if reason else "-")

    return handler


async def serve_echo(name: str, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
    await serve_websocket(echo_backend(name), host, port, None, task_status=task_status)
