"""Backend state that outlives a config generation. No I/O here.

The ``Registry`` maps a backend address to its ``BackendState``. Entries are
keyed by address, not by config object, so a reload that keeps a backend keeps
its counters (and, with the pools issue, its health). It is created by the
application and passed down: there is no module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import Address


@dataclass(slots=True)
class BackendState:
    address: Address
    active: int = 0  # established sessions
    total: int = 0  # sessions ever established


class Registry:
    __slots__ = ("_states",)

    def __init__(self) -> None:
        self._states: dict[Address, BackendState] = {}

    def state(self, address: Address) -> BackendState:
        """The state of ``address``, created on first use."""
        state = self._states.get(address)
        if state is None:
            state = self._states[address] = BackendState(address)
        return state

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._states.values())
