"""The chat demo: one room, the chat backends that share it, and the page that talks to them.

Not part of the proxy: ``make demo`` runs all of this in its own process, so
that the proxy has something a browser can watch. Three backends behind one
pool share one ``Room``, so a tab that the proxy moves to another backend
(a drain, a restart) stays in the same conversation.

::

    Room                    in-process pub/sub: members, the last HISTORY events, presence (no I/O)
    serve_chat(name, room)  a trio-websocket backend; any number of them share one Room
    serve_page(site)        a tiny trio + h11 static server: index.html, chat.js, chat.css
                            and a generated config.js that says where the proxy is

The protocol is JSON text messages. A page connects to ``/chat?nick=NAME``:

- backend → page: ``{"type": "hello", "backend": "chat-2", "address": "127.0.0.1:9012",
  "text": "connected to chat-2", "history": [event, ...]}`` first, then events
  ``{"type": "message" | "join" | "leave", "id": 17, "nick": "ada", "backend": "chat-1",
  "text": "..."}`` (``id`` grows by one per event of the room, so a page that
  reconnects shows each event once) and ``{"type": "presence", "members":
  [{"nick": "ada", "backend": "chat-1"}, ...]}``.
- page → backend: ``{"type": "say", "nick": "ada", "text": "..."}``. Any other
  text message is said as it is, so ``python -m websockets`` can chat too.

Connections to ``/healthz`` are wsproxy's health checks: they are accepted,
their pings are answered (trio-websocket does that), and nothing is said or logged.
"""

from __future__ import annotations

import itertools
import json
import logging
import unicodedata
from http import HTTPStatus
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from trio_websocket import ConnectionClosed, Endpoint, WebSocketConnection, WebSocketRequest, serve_websocket

log = logging.getLogger("wsproxy.demo.chat")

HISTORY = 100  # events a new member gets in its hello
OUTBOX = 256  # events queued for one member; a member that falls this far behind is closed
MAX_TEXT_CHARS = 2000  # longer messages are cut
MAX_NICK_CHARS = 24
CLOSE_TOO_SLOW = 1008  # RFC 6455 §7.4.1: policy violation (here: not reading fast enough)

Event = dict[str, Any]


# -- the room (no I/O) -----------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class Member:
    """One connected page: who, through which backend, and its queue of outgoing JSON texts."""

    nick: str
    backend: str
    outbox: trio.MemorySendChannel[str] = field(repr=False)


class Room:
    """Everyone connected to any chat backend of this process.

    ``join``/``say``/``leave`` never wait: each event is queued on every
    member's outbox with ``send_nowait``. A member whose outbox is full is
    dropped (its outbox closed; its backend then closes it with 1008), so one
    stalled tab never holds up the room.
    """

    def __init__(self, history: int = HISTORY) -> None:
        self.members: dict[Member, None] = {}  # insertion-ordered set
        self.history: deque[Event] = deque(maxlen=history)
        self._ids = itertools.count(1)

    def join(self, member: Member) -> list[Event]:
        """Add ``member``; return the history before its join (the join itself comes through the outbox)."""
        backlog = list(self.history)
        self.members[member] = None
        self._event("join", member)
        self._presence()
        return backlog

    def say(self, member: Member, text: str) -> None:
        self._event("message", member, text)

    def rename(self, member: Member, nick: str) -> None:
        if nick != member.nick:
            member.nick = nick
            self._presence()

    def leave(self, member: Member) -> None:
        if self.members.pop(member, False) is not False:
            self._event("leave", member)
            self._presence()

    def _event(self, kind: str, member: Member, text: str = "") -> None:
        event: Event = {"type": kind, "id": next(self._ids), "nick": member.nick, "backend": member.backend}
        if text:
            event["text"] = text
        self.history.append(event)
        self._broadcast(event)

    def _presence(self) -> None:
        members = [{"nick": m.nick, "backend": m.backend} for m in self.members]
        self._broadcast({"type": "presence", "members": members})

    def _broadcast(self, document: Event) -> None:
        data = json.dumps(document)
        for member in list(self.members):
            try:
                member.outbox.send_nowait(data)
            except trio.WouldBlock:
                log.warning("event=dropped backend=%s nick=%s reason=outbox_full", member.backend, member.nick)
                del self.members[member]
                member.outbox.close()
            except trio.ClosedResourceError:
                del self.members[member]


def clean_text(text: str, limit: int) -> str:
    """``text`` without control characters, stripped and cut to ``limit`` characters."""
    kept = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch == " ")
    return kept.strip()[:limit]


def nick_from_target(target: str) -> str:
    """The ``nick`` query parameter of a request target, cleaned; "anon" if there is none."""
    values = parse_qs(urlsplit(target).query).get("nick", [])
    return (clean_text(values[0], MAX_NICK_CHARS) if values else "") or "anon"


def parse_said(message: str, nick: str) -> tuple[str, str]:
    """(nick, text) of a message from a page: a ``say`` document, or any other text as it is."""
    try:
        document = json.loads(message)
    except ValueError:
        document = None
    if isinstance(document, dict) and document.get("type") == "say" and isinstance(document.get("text"), str):
        given = document.get("nick")
        if isinstance(given, str):
            nick = clean_text(given, MAX_NICK_CHARS) or nick
        return nick, clean_text(document["text"], MAX_TEXT_CHARS)
    return nick, clean_text(message, MAX_TEXT_CHARS)


# -- the chat backends (trio shell) ----------------------------------------------------------------


def chat_backend(name: str, room: Room):  # type: ignore[no-untyped-def]
    """A trio-websocket request handler: backend ``name`` of ``room``."""

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        if urlsplit(request.path).path == "/healthz":
            await _answer_health_check(ws)
            return
        try:
            await _serve_member(ws, name, room, nick_from_target(request.path))
        except Exception:  # a bug in the demo must not take the backend down
            log.exception("event=error backend=%s", name)

    return handler


async def _answer_health_check(ws: WebSocketConnection) -> None:
    try:
        while True:
            await ws.get_message()  # pings are answered inside trio-websocket
    except ConnectionClosed:
        pass


async def _serve_member(ws: WebSocketConnection, name: str, room: Room, nick: str) -> None:
    outbox, inbox = trio.open_memory_channel[str](OUTBOX)
    member = Member(nick, name, outbox)
    address = _show(ws.local)
    log.info("event=open backend=%s nick=%s peer=%s", name, nick, _show(ws.remote))
    code: int | str = "-"
    try:
        backlog = room.join(member)
        hello = {"type": "hello", "backend": name, "address": address, "text": f"connected to {name}", "history": backlog}
        async with trio.open_nursery() as nursery:
            try:
                await ws.send_message(json.dumps(hello))  # first; the events since the join wait in the outbox
                nursery.start_soon(_send_outbox, ws, inbox)
                while True:
                    message = await ws.get_message()
                    if isinstance(message, str):
                        member_nick, text = parse_said(message, member.nick)
                        room.rename(member, member_nick)
                        if text:
                            room.say(member, text)
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason else "-"
            nursery.cancel_scope.cancel()
    finally:
        room.leave(member)
        outbox.close()
        log.info("event=close backend=%s nick=%s code=%s", name, member.nick, code)


def _show(endpoint: Endpoint | str) -> str:
    return f"{endpoint.address}:{endpoint.port}" if isinstance(endpoint, Endpoint) else endpoint


async def _send_outbox(ws: WebSocketConnection, inbox: trio.MemoryReceiveChannel[str]) -> None:
    try:
        async for data in inbox:
            await ws.send_message(data)
        await ws.aclose(CLOSE_TOO_SLOW, "too slow to keep up with the room")  # the room dropped us
    except ConnectionClosed:
        pass


async def serve_chat(name: str, room: Room, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
    """Run chat backend ``name`` on ``host:port`` (0: any free port); ``started`` gets the WebSocketServer."""
    await serve_websocket(chat_backend(name, room), host, port, None, task_status=task_status)


# -- the page server (trio + h11) ------------------------------------------------------------------

_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}
MAX_HEAD_BYTES = 16 * 1024
IDLE_S = 30.0  # a keep-alive connection with no new request for this long is closed

WEB_DIR = Path(__file__).resolve().parent / "web"


@dataclass(frozen=True, slots=True)
class Site:
    """What the page server serves: the files of ``web_dir`` by name, and config.js."""

    proxy_port: int  # the page connects to ws://<the page's host>:proxy_port/chat
    admin_port: int  # for the link to the status page
    web_dir: Path = WEB_DIR

    def config_js(self) -> bytes:
        settings = {"proxyPort": self.proxy_port, "chatPath": "/chat", "adminPort": self.admin_port}
        return (
            "// Generated by python -m wsproxy.demo: where this demo's proxy and admin listener are.\n"
            f"window.WSPROXY_DEMO = {json.dumps(settings)};\n"
        ).encode()

    async def answer(self, method: bytes, target: bytes) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request."""
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        path = urlsplit(target.decode("ascii", "replace")).path
        name = "index.html" if path == "/" else path.lstrip("/")
        if name == "config.js":
            return 200, "text/javascript; charset=utf-8", self.config_js()
        if name not in _TYPES:  # only these names: nothing else of the disk is reachable
            return 404, "text/plain; charset=utf-8", b"not found\n"
        body = await trio.Path(self.web_dir / name).read_bytes()  # read per request: edit, reload the tab
        return 200, _TYPES[name], body


async def serve_page(site: Site, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
    """Serve ``site`` on ``host:port`` (0: any free port); ``started`` gets the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_serve_http, site=site), listeners)


async def _serve_http(stream: trio.abc.Stream, site: Site) -> None:
    """Answer requests on one connection (keep-alive) until it closes, errs or idles."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        while True:
            request = end = None
            with trio.move_on_after(IDLE_S):
                request = await _next_event(stream, conn)
                if isinstance(request, h11.Request):
                    while not isinstance(end := await _next_event(stream, conn), (h11.EndOfMessage, h11.ConnectionClosed)):
                        pass  # a body: read and ignored
            if not isinstance(request, h11.Request) or not isinstance(end, h11.EndOfMessage):
                return  # closed, idle or slow: nothing to answer
            status, content_type, body = await site.answer(request.method, request.target)
            log.info("event=page method=%s target=%s status=%d", request.method.decode(), request.target.decode(), status)
            headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")]
            if status == 405:
                headers.append(("Allow", "GET, HEAD"))
            data = conn.send(h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)) or b""
            if request.method != b"HEAD":
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            if conn.our_state is not h11.DONE:
                return  # h11 says this connection must close
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            response = h11.Response(status_code=exc.error_status_hint, headers=[("Content-Length", "0"), ("Connection", "close")])
            try:
                await stream.send_all((conn.send(response) or b"") + (conn.send(h11.EndOfMessage()) or b""))
            except (trio.BrokenResourceError, h11.LocalProtocolError):
                pass
    except trio.BrokenResourceError:
        pass


async def _next_event(stream: trio.abc.Stream, conn: h11.Connection) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(bytes(await stream.receive_some(65536)))  # b"" at EOF: h11 makes it ConnectionClosed
    return event
