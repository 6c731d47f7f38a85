"""The App is what the edge and the control modules see of it: every member of their Protocols exists on a real App.

mypy checks the same thing statically (``app.py``: ``_host: type[SessionHost] = App``,
and the calls ``snapshot(self)`` and ``readiness(self)``); this test checks it at
run time, where a property computed in ``__init__`` or a renamed method shows too,
and that the methods take the parameters the Protocol names.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import pytest

from tests.kit.servers import make_config
from wsproxy.app import App
from wsproxy.control.ready import ReadySource
from wsproxy.control.status import StatusSource
from wsproxy.edge.host import SessionGeneration, SessionHost, SessionMetrics


def members(protocol: type) -> dict[str, object]:
    """Name → what the Protocol (with its Protocol bases) declares: a function, a property or an annotation."""
    found: dict[str, object] = {}
    for cls in reversed(protocol.__mro__):
        if cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        found.update({name: annotation for name, annotation in getattr(cls, "__annotations__", {}).items()})
        found.update({name: value for name, value in vars(cls).items() if not name.startswith("_")})
    return found


def missing(obj: object, protocol: type) -> list[str]:
    """What ``obj`` lacks of ``protocol``: absent members, and methods whose parameters differ."""
    problems = []
    for name, declared in members(protocol).items():
        if not hasattr(obj, name):
            problems.append(f"{type(obj).__name__} has no {name}")
            continue
        if inspect.isfunction(declared):
            actual = getattr(obj, name)
            if not callable(actual):
                problems.append(f"{type(obj).__name__}.{name} is not callable")
                continue
            wanted = list(inspect.signature(declared).parameters)[1:]  # without self
            if list(inspect.signature(actual).parameters) != wanted:
                problems.append(f"{type(obj).__name__}.{name}{inspect.signature(actual)} is not {name}({', '.join(wanted)})")
    return problems


@pytest.fixture
def app() -> App:
    return App(make_config([9]), engine=False)


def test_the_app_is_a_session_host(app: App) -> None:
    assert missing(app, SessionHost) == []
    assert missing(app.metrics, SessionMetrics) == []
    assert missing(app.generation, SessionGeneration) == []


def test_the_app_is_what_status_and_readiness_read(app: App) -> None:
    assert missing(app, StatusSource) == []
    assert missing(app, ReadySource) == []


def test_what_the_session_host_promises() -> None:
    """The list itself: what a session may read and change on the process (edge/host.py)."""
    assert set(members(SessionHost)) == {
        "generation", "registry", "metrics", "engine", "jwks", "tickets", "stopping", "next_conn_id",
        "admit_connection", "connection_closed", "admit_lifetime", "admit_identity", "release_identity",
        "session_established", "session_ended",
    }  # fmt: skip


def test_a_host_without_a_member_is_found_out(app: App) -> None:
    class Partial:
        def __getattr__(self, name: str) -> Any:
            if name in ("session_ended", "admit_identity"):
                raise AttributeError(name)
            return getattr(app, name)

    assert missing(Partial(), SessionHost) == ["Partial has no admit_identity", "Partial has no session_ended"]
