"""``make demo``: a chat page, chat and echo backends, and the proxy in front of them, until Ctrl-C.

::

    run                         this process, one trio nursery
    ├── echo-1, echo-2          backends.serve_echo, pool "echo" (route /)
    ├── chat-1, chat-2, chat-3  chat.serve_chat sharing one chat.Room, pool "chat" (route /chat)
    ├── page                    chat.serve_page: the chat page on http://127.0.0.1:8000/
    └── wsproxy run -c ...      the proxy: a child process in its own session

The backends and the page run in this process; the proxy runs as the real
``wsproxy run`` command with ``demo.yaml`` (package data in ``wsproxy/demo/conf/``,
read through importlib.resources, so an installed wheel runs it), exactly as an operator would
run it, so its log lines are the ones you would see in production. The page
is served here, not by the proxy: wsproxy only proxies WebSockets.

Ports: the defaults are the ones written in ``demo.yaml``. With
``--proxy-port``, ``--page-port``, ``--admin-port`` or ``--backend-base-port``
(the backends listen on base+1, base+2 for echo and base+11..13 for chat) the
demo runs a copy of the config with every such address rewritten, from a
temporary directory; 0 means any free port (the tests run the demo that way).

This module is not part of the proxy and nothing in ``wsproxy`` imports it.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from importlib import resources
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import trio

from .backends import serve_echo
from .chat import Room, Site, serve_chat, serve_page

ROOT = Path(__file__).resolve().parents[2]
#: The demo's config and its cookie key, shipped in the wheel as package data.
CONFIG_RESOURCE = "conf/demo.yaml"
HOST = "127.0.0.1"
READY_TIMEOUT_S = 15.0  # for the proxy and its admin listener to accept connections
STOP_TIMEOUT_S = 10.0  # for the proxy to exit after SIGTERM before it is killed

#: (name, offset from the backend base port); demo.yaml has them at base 9000.
ECHO_BACKENDS = (("echo-1", 1), ("echo-2", 2))
CHAT_BACKENDS = (("chat-1", 11), ("chat-2", 12), ("chat-3", 13))


@dataclass(frozen=True, slots=True)
class Ports:
    """Where the demo listens; the defaults are the addresses in demo.yaml. 0: any free port."""

    proxy: int = 8080
    page: int = 8000
    admin: int = 9090
    backend_base: int = 9000

    def backend(self, offset: int) -> int:
        return self.backend_base + offset if self.backend_base else 0


@dataclass(frozen=True, slots=True)
class Bound:
    """The ports actually in use (never 0)."""

    proxy: int
    page: int
    admin: int
    backends: dict[str, int]  # backend name → port


def free_port() -> int:
    """A loopback port nobody listens on right now (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def render_config(source: Path, bound: Bound, directory: Path) -> Path:
    """``source`` itself when every port is its default, else a copy with the bound ports in ``directory``.

    Every ``127.0.0.1:PORT`` and ``localhost:PORT`` of a default port is
    rewritten (listener, admin, backends, the page's origins), and relative
    ``*_file`` paths are made absolute, since they are relative to the config.
    """
    default = Ports()
    mapping = {default.proxy: bound.proxy, default.page: bound.page, default.admin: bound.admin}
    for name, offset in (*ECHO_BACKENDS, *CHAT_BACKENDS):
        mapping[default.backend(offset)] = bound.backends[name]
    if all(old == new for old, new in mapping.items()):
        return source
    text = source.read_text()
    text = re.sub(
        r"\b(127\.0\.0\.1|localhost):(\d+)\b", lambda m: f"{m[1]}:{mapping.get(int(m[2]), int(m[2]))}", text
    )
    text = re.sub(
        r"(?m)^(\s*\w*_file\s*:\s*)([^\s#\"'{}\[\],]+)",
        lambda m: m[1] + str((source.parent / m[2]).resolve()),
        text,
    )
    rendered = directory / source.name
    rendered.write_text(text)
    return rendered


async def start_servers(nursery: trio.Nursery, ports: Ports) -> Bound:
    """Start the backends and the page in ``nursery``; raises OSError when a port is taken."""
    proxy = ports.proxy or free_port()
    admin = ports.admin or free_port()
    backends: dict[str, int] = {}
    for name, offset in ECHO_BACKENDS:
        server = await nursery.start(serve_echo, name, HOST, ports.backend(offset))
        backends[name] = server.port
    room = Room()  # one room for all chat backends: a tab that moves stays in the conversation
    for name, offset in CHAT_BACKENDS:
        server = await nursery.start(serve_chat, name, room, HOST, ports.backend(offset))
        backends[name] = server.port
    page = await nursery.start(serve_page, Site(proxy_port=proxy, admin_port=admin), HOST, ports.page)
    return Bound(proxy=proxy, page=page, admin=admin, backends=backends)


async def _wait_ready(proxy: subprocess.Popen[bytes], ports: list[int]) -> bool:
    """True once every port accepts; False if the proxy exited or it took too long."""
    with trio.move_on_after(READY_TIMEOUT_S):
        for port in ports:
            while True:
                if proxy.poll() is not None:
                    return False
                try:
                    stream = await trio.open_tcp_stream(HOST, port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                break
        return True
    return False


async def _forward_signals(signals: AsyncIterator[int], proxy: subprocess.Popen[bytes]) -> None:
    """Each Ctrl-C (or SIGTERM) becomes a SIGTERM to the proxy: the first closes gracefully, a second at once."""
    async for _ in signals:
        if proxy.poll() is None:
            proxy.send_signal(signal.SIGTERM)


def instructions(bound: Bound, config: Path) -> str:
    chat = ", ".join(f"{name} = {HOST}:{bound.backends[name]}" for name, _ in CHAT_BACKENDS)
    echo = ", ".join(f"{name} = {HOST}:{bound.backends[name]}" for name, _ in ECHO_BACKENDS)
    shown = config.relative_to(ROOT) if config.is_relative_to(ROOT) else config
    return (
        f"demo at http://{HOST}:{bound.page}/ (status page http://{HOST}:{bound.admin}/, "
        f"proxy ws://{HOST}:{bound.proxy}/; Ctrl-C stops)\n"
        "\n"
        f"  wsproxy is running with {shown}; its log lines follow.\n"
        "\n"
        f"  Chat      open http://127.0.0.1:{bound.page}/ and http://localhost:{bound.page}/ in two tabs\n"
        "            (two names, two cookie jars: each tab gets its own backend and keeps it).\n"
        "            Each tab shows its backend, the room and its connection state.\n"
        f"            Pool chat: {chat}.\n"
        f"  Status    open http://127.0.0.1:{bound.admin}/ and press Drain on one tab's backend: that tab\n"
        "            gets close 1012, waits 1-3 s, reconnects to another backend and stays in the room.\n"
        "            Undrain puts the backend back in rotation.\n"
        f"  Echo      .venv/bin/python -m websockets ws://127.0.0.1:{bound.proxy}/\n"
        f"            each connection is greeted by the backend that got it ({echo}).\n"
        "\n"
        "  Stop: Ctrl-C\n"
    )


async def run(config: Path, ports: Ports) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-5s %(name)s %(message)s")
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        tempfile.TemporaryDirectory(prefix="wsproxy-demo-") as tmp,
    ):
        async with trio.open_nursery() as nursery:
            try:
                bound = await start_servers(nursery, ports)
            except OSError as exc:
                print(
                    f"\n  demo: cannot listen: {exc.strerror or exc}. Is another demo running?\n"
                    "  Other ports: python -m wsproxy.demo --page-port 0 --backend-base-port 0 "
                    "--proxy-port 0 --admin-port 0\n",
                    file=sys.stderr,
                    flush=True,
                )
                nursery.cancel_scope.cancel()
                return 1
            rendered = render_config(config, bound, Path(tmp))
            # Its own session: Ctrl-C reaches only us, and we forward it as SIGTERM.
            proxy = subprocess.Popen(
                [sys.executable, "-m", "wsproxy", "run", "-c", str(rendered)], start_new_session=True
            )
            try:
                nursery.start_soon(_forward_signals, signals, proxy)
                if await _wait_ready(proxy, [bound.proxy, bound.admin]):
                    print(instructions(bound, config), flush=True)
                elif proxy.poll() is None:
                    print(f"\n  demo: the proxy is not listening on {bound.proxy} yet; see its log.\n", flush=True)
                while proxy.poll() is None:
                    await trio.sleep(0.2)
                return proxy.returncode
            finally:
                if proxy.poll() is None:
                    proxy.send_signal(signal.SIGTERM)
                    with trio.move_on_after(STOP_TIMEOUT_S):
                        while proxy.poll() is None:
                            await trio.sleep(0.05)
                    if proxy.poll() is None:
                        proxy.kill()
                        proxy.wait()
                nursery.cancel_scope.cancel()
    return 0  # not reached: the nursery block returns


def main() -> int:
    default = Ports()
    parser = argparse.ArgumentParser(
        prog="python -m wsproxy.demo",
        description="The wsproxy demo: a chat page and echo, through the proxy. Port 0 = any free port.",
    )
    parser.add_argument("-c", "--config", type=Path, default=None, help="default: the demo.yaml shipped in the package")
    parser.add_argument("--proxy-port", type=int, default=default.proxy, help="the proxy's listener (%(default)s)")
    parser.add_argument("--page-port", type=int, default=default.page, help="the chat page (%(default)s)")
    parser.add_argument("--admin-port", type=int, default=default.admin, help="the admin listener (%(default)s)")
    parser.add_argument(
        "--backend-base-port", type=int, default=default.backend_base,
        help="echo on base+1, base+2; chat on base+11..13 (%(default)s)",
    )
    args = parser.parse_args()
    ports = Ports(proxy=args.proxy_port, page=args.page_port, admin=args.admin_port, backend_base=args.backend_base_port)
    if args.config is not None:
        return trio.run(run, args.config.resolve(), ports)
    # Installed as files (a wheel, an editable install), this is the file itself, beside its cookie key.
    with resources.as_file(resources.files(__package__ or "wsproxy.demo") / CONFIG_RESOURCE) as config:
        return trio.run(run, config.resolve(), ports)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
