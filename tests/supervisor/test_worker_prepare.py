"""A worker keeps answering while a reload's config loads (``supervisor.worker``).

The real worker (``_main``, its ``Worker`` and a real ``App`` on a real
listening socket) runs in this process; the test speaks the supervisor's side
of the real channel (a Unix socketpair, ``supervisor.ipc``). Loading is made
slow by holding the real loader until the test lets it go: a reload of a
large config can take up to ``timeouts.reload``, and until now the worker read
no message meanwhile, so the sessions API saw it as unanswered.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from wsproxy.config.snapshot import ConfigTexts
from wsproxy.edge.contexts import load_checked
from wsproxy.supervisor import worker as worker_module
from wsproxy.supervisor.ipc import Channel
from wsproxy.supervisor.messages import Message

CONFIG = """\
listeners: [{name: public, bind: "127.0.0.1:0"}]
routes: [{path: /, pool: echo}]
pools: {echo: {backends: [{address: "127.0.0.1:9"}]}}
timeouts: {reload: 30s}
"""


class HeldLoader:
    """The real ``load_snapshot``, which waits for ``release`` when ``hold`` is set."""

    def __init__(self) -> None:
        self.hold = False
        self.started = threading.Event()
        self.released = threading.Event()
        self._real = worker_module.load_snapshot

    def __call__(self, path: str, message: Message) -> Any:
        if self.hold:
            self.started.set()
            self.released.wait(20)
        return self._real(path, message)


@asynccontextmanager
async def running_worker(tmp_path: Path, loader: HeldLoader) -> AsyncIterator[Channel]:
    """A started worker, ready; yields the supervisor's end of its channel."""
    path = tmp_path / "wsproxy.yaml"
    path.write_text(CONFIG)
    texts = ConfigTexts()
    load_checked(str(path), texts)
    ours, theirs = socket.socketpair()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    wsproxy_log = logging.getLogger("wsproxy")
    saved_log = (wsproxy_log.handlers[:], wsproxy_log.level, wsproxy_log.propagate)
    saved_gc = gc.get_threshold()
    channel = Channel(ours)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker_module._main, str(path), Channel(theirs), None)
            await channel.send({"t": "config", "config": texts.snapshot().to_data()})
            hello, _ = await channel.receive()
            assert hello["t"] == "hello" and "fingerprint" in hello, hello
            start = {"t": "start", "slot": 0, "workers": 1, "listeners": {"public": 1}, "generation": 1, "health": []}
            await channel.send(start, [listener])
            await next_of(channel, "ready")
            yield channel
            await channel.send({"t": "shutdown", "now": True})
    finally:
        listener.close()
        channel.close()
        wsproxy_log.handlers[:], wsproxy_log.level, wsproxy_log.propagate = saved_log[0], saved_log[1], saved_log[2]
        gc.unfreeze()  # the worker froze what existed (gc_tuning): give this process its settings back
        gc.set_threshold(*saved_gc)


async def next_of(channel: Channel, kind: str) -> Message:
    """The next message of type ``kind`` (reports and the like in between are skipped)."""
    while True:
        message, _ = await channel.receive()
        if message["t"] == kind:
            return message


async def prepare_held(channel: Channel, tmp_path: Path, loader: HeldLoader) -> None:
    """Send ``prepare`` for round 1 (the config file's snapshot) and return once its load is held."""
    texts = ConfigTexts()
    load_checked(str(tmp_path / "wsproxy.yaml"), texts)
    loader.hold = True
    await channel.send({"t": "prepare", "round": 1, "listeners": {}, "config": texts.snapshot().to_data()})
    await trio.to_thread.run_sync(loader.started.wait, 10)


async def test_a_worker_answers_the_sessions_api_while_a_reload_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = HeldLoader()
    monkeypatch.setattr(worker_module, "load_snapshot", loader)
    with trio.fail_after(30):
        async with running_worker(tmp_path, loader) as channel:
            await prepare_held(channel, tmp_path, loader)
            await channel.send({"t": "ask", "id": 7, "what": "sessions", "query": {"limit": 10}})
            with trio.fail_after(5):  # before the load ends: the reload did not stop the worker's answers
                answer = await next_of(channel, "answer")
            assert answer["id"] == 7 and answer["data"] == {"sessions": [], "more": False}
            assert not loader.released.is_set()
            loader.released.set()
            prepared = await next_of(channel, "prepared")
            assert prepared["round"] == 1 and prepared["errors"] == [] and prepared["fingerprint"]
            await channel.send({"t": "commit", "round": 1})
            committed = await next_of(channel, "committed")
            assert committed["errors"] == [] and committed["generation"] == 2


async def test_a_round_abandoned_while_it_loads_is_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor gave up on the round (a sibling's error, its timeout): what loads late is dropped."""
    loader = HeldLoader()
    monkeypatch.setattr(worker_module, "load_snapshot", loader)
    with trio.fail_after(30):
        async with running_worker(tmp_path, loader) as channel:
            await prepare_held(channel, tmp_path, loader)
            await channel.send({"t": "abandon", "round": 1})
            loader.released.set()
            await next_of(channel, "prepared")
            await channel.send({"t": "commit", "round": 1})  # (a supervisor never does this; it shows what was kept)
            committed = await next_of(channel, "committed")
            assert committed["errors"] == ["reload round 1 was not prepared here"]
            assert committed["generation"] == 1
