"""A proxy with sessions to list and close: an in-process ``App``, its admin API, clients that hold sessions.

``start_stack(nursery)`` runs a real ``App`` (``start_proxy``) with a route
``/chat`` that takes the static bearer tokens of ``USERS`` (or no auth), a
catch-all route, pool "main" over one trio-websocket echo backend that
records the close code it gets (``Backend``), and ``serve_admin`` for the App
with ``ADMIN_TOKEN``. ``open_client`` opens a trio-websocket session as a user
(or nobody), says hello and keeps it open in the test's nursery until the
proxy closes it, recording the code and reason (``Client``).

For a proxy run as a process (``tests.kit.process.running``): ``cli_config``
writes the same kind of config as text (``CLI_USERS``' tokens, an admin
token file), and ``hold`` holds a session of one of those users.

What is not here: the admin client (``tests.kit.admin``) and the process
harness (``tests.kit.process``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from functools import partial

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, open_websocket_url

from tests.kit.servers import make_config, start_proxy, start_ws_backend
from wsproxy.app import App
from wsproxy.config.schema import (
    Address,
    AdminConfig,
    AuthConfig,
    LimitsConfig,
    PoolName,
    RouteConfig,
    StickyConfig,
    TokenConfig,
)
from wsproxy.control.admin import serve_admin

#: The admin API's token.
ADMIN_TOKEN = b"admin-s3cret"
#: The static bearer tokens of the ``/chat`` route, by identity.
USERS = {"alice": "tok-alice-0123456789", "bob": "tok-bob-9876543210"}


@dataclass
class Backend:
    port: int
    close_codes: list[int | None] = field(default_factory=list)  # what the backend got, per session


async def start_backend(nursery: trio.Nursery) -> Backend:
    backend = Backend(0)

    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed as exc:
            backend.close_codes.append(exc.reason.code if exc.reason else None)

    backend.port = await start_ws_backend(nursery, handler)
    return backend


@dataclass
class Stack:
    app: App
    port: int
    backend: Backend
    admin: str

    @property
    def url(self) -> str:
        """The status page."""
        return f"http://{self.admin}/"


async def start_stack(
    nursery: trio.Nursery,
    *,
    auth: bool = True,
    limits: LimitsConfig | None = None,
    sticky_ip: bool = False,
    admin_token: bytes | None = ADMIN_TOKEN,
) -> Stack:
    backend = await start_backend(nursery)
    route = RouteConfig(pool=PoolName("main"), path="/chat")
    if auth:
        tokens = tuple(TokenConfig(name=n, sha256=hashlib.sha256(t.encode()).digest()) for n, t in USERS.items())
        route = dataclasses.replace(route, auth=AuthConfig(mode="tokens", tokens=tokens))
    config = make_config([backend.port], routes=(route, RouteConfig(pool=PoolName("main"))), limits=limits)
    if sticky_ip:
        pool = dataclasses.replace(config.pools[PoolName("main")], sticky=StickyConfig(source="ip"))
        config = dataclasses.replace(config, pools={PoolName("main"): pool})
    app, port = await start_proxy(nursery, config)
    admin_config = AdminConfig(bind=Address("127.0.0.1", 0), token_file="/t" if admin_token else None, token=admin_token)
    address = await nursery.start(partial(serve_admin, app, admin_config))
    return Stack(app, port, backend, address)


@dataclass
class Client:
    ws: WebSocketConnection
    received: trio.MemoryReceiveChannel[str | bytes]  # what the backend echoed, read by the client's task
    closed: trio.Event = field(default_factory=trio.Event)
    code: int | None = None
    reason: str | None = None

    async def echo(self, message: str) -> str | bytes:
        await self.ws.send_message(message)
        return await self.received.receive()


async def open_client(stack: Stack, nursery: trio.Nursery, user: str | None = None, path: str = "/chat") -> Client:
    """A session that says hello, then waits until the proxy closes it (kept in ``nursery``)."""
    headers = [("Authorization", f"Bearer {USERS[user]}")] if user else []

    async def run(*, task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{stack.port}{path}", extra_headers=headers) as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            send, received = trio.open_memory_channel[str | bytes](16)
            client = Client(ws, received)
            task_status.started(client)
            try:
                while True:
                    await send.send(await ws.get_message())
            except ConnectionClosed as exc:
                client.code = exc.reason.code if exc.reason else None
                client.reason = exc.reason.reason if exc.reason else None
            client.closed.set()

    result: Client = await nursery.start(run)
    return result


# -- the same for a ``wsproxy run`` process (``tests.kit.process.running``) --------------------------


#: The static bearer tokens of ``cli_config``'s ``/chat`` route (a ``wsproxy run`` process), by identity.
CLI_USERS = {"alice": "cli-tok-alice-0123456789", "bob": "cli-tok-bob-0123456789"}


def cli_config(port: int, backend: int, admin_port: int) -> str:
    """A config file's text: ``/chat`` over ``CLI_USERS``' tokens, the admin API with ``admin.token`` beside it."""
    tokens = ", ".join(f"{{name: {n}, sha256: '{hashlib.sha256(t.encode()).hexdigest()}'}}" for n, t in CLI_USERS.items())
    return (
        f"listeners: [{{name: public, bind: '127.0.0.1:{port}'}}]\n"
        f"routes: [{{path: /chat, pool: echo, auth: {{tokens: [{tokens}]}}}}]\n"
        f"pools: {{echo: {{backends: [{{address: '127.0.0.1:{backend}'}}]}}}}\n"
        "shutdown: {timeout: 2s, spread: 0s}\n"
        f"admin: {{bind: '127.0.0.1:{admin_port}', token_file: admin.token}}\n"
    )


async def hold(port: int, user: str, nursery: trio.Nursery) -> tuple[WebSocketConnection, trio.Event, list[object]]:
    """A session of ``user`` (of ``CLI_USERS``) to ``/chat`` held open; the list gets (code, reason) when the proxy closes it."""
    ended = trio.Event()
    outcome: list[object] = []

    async def run(*, task_status: trio.TaskStatus[WebSocketConnection] = trio.TASK_STATUS_IGNORED) -> None:
        headers = [("Authorization", f"Bearer {CLI_USERS[user]}")]
        async with open_websocket_url(f"ws://127.0.0.1:{port}/chat", extra_headers=headers) as ws:
            await ws.send_message("hi")
            await ws.get_message()
            task_status.started(ws)
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                outcome.extend([exc.reason.code, exc.reason.reason])
            ended.set()

    ws = await nursery.start(run)
    return ws, ended, outcome
