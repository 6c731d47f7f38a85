"""The supervisor's listening sockets: N ``SO_REUSEPORT`` sockets per listener address, or systemd's (a part of ``supervisor.main``).

Each listener gets one socket group per worker slot (a group: one socket per
address its bind resolves to). An upgrade's new generation takes the old
one's (``upgrade.take_upgrade_fds``); systemd's socket activation gives one
group that every slot shares. The supervisor keeps them all open for its whole
life; a worker gets its slot's group with its ``start`` message.

What this is not: the accepting (each worker's ``App``) or the binding itself
(``edge.listener.open_listener``). Nothing here awaits.
"""

from __future__ import annotations

import logging
import socket

from ..config.schema import Config, ListenerConfig
from ..edge.listener import open_listener
from ..log import log_event
from .state import SlotSockets, SupervisorState


log = logging.getLogger("wsproxy.supervisor")



class ListeningSockets(SupervisorState):
    """``Supervisor``'s part that opens the listening sockets and hands out each slot's."""

    def _open_all(self, config: Config, names: set[str] | None = None) -> dict[str, SlotSockets]:
        """N SO_REUSEPORT sockets per address of each listener (``names``: only those); OSError if one cannot bind."""
        opened: dict[str, SlotSockets] = {}
        try:
            for spec in config.listeners:
                if names is not None and spec.name not in names:
                    continue
                opened[spec.name] = self._open_listener(spec)
        except BaseException:
            _close_all(opened)
            raise
        return opened

    def _open_listener(self, spec: ListenerConfig) -> SlotSockets:
        shared = self.activated.pop(spec.name, None)
        if shared:  # systemd passed one socket: every worker accepts on it
            log_event(
                log,
                logging.INFO,
                "listener_inherited",
                listener=spec.name,
                sockets=len(shared),
                shared_by_workers=self.count,
            )
            return [shared for _ in range(self.count)]
        passed = self.passed.pop(spec.name, None)
        slots: SlotSockets = []
        if passed and _same_address(passed[0], spec):
            slots = passed[: self.count]
            _close_all({spec.name: passed[self.count :]})  # fewer workers than before (see README, "Workers")
        elif passed:
            _close_all({spec.name: passed})
        port = slots[0][0].getsockname()[1] if slots else None
        try:
            while len(slots) < self.count:
                group = open_listener(spec, reuse_port=True, port=port)
                slots.append(group)
                port = group[0].getsockname()[1]
        except BaseException:
            _close_all({spec.name: slots})
            raise
        return slots

    def _slot_sockets(self, index: int, sockets: dict[str, SlotSockets]) -> tuple[dict[str, int], list[socket.socket]]:
        counts: dict[str, int] = {}
        flat: list[socket.socket] = []
        for name, slots in sockets.items():
            counts[name] = len(slots[index])
            flat.extend(slots[index])
        return counts, flat


def _same_address(group: list[socket.socket], spec: ListenerConfig) -> bool:
    try:
        host, port = group[0].getsockname()[:2]
    except (OSError, IndexError):
        return False
    return (spec.bind.port in (0, port)) and (host == spec.bind.host or spec.bind.host in ("localhost",))


def _close_all(sockets: dict[str, SlotSockets]) -> None:
    for slots in sockets.values():
        for group in slots:
            for sock in group:
                sock.close()

