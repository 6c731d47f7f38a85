"""pytest set-up shared by every test module."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=300, deadline=None)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture(params=["engine", "trio"])
def relay_driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with the epoll engine and once with the per-session trio pumps.

    Modules that test relaying use it with ``pytestmark = pytest.mark.usefixtures("relay_driver")``;
    the App reads WSPROXY_RELAY when it is built, so every proxy the test starts uses that driver.
    """
    driver = str(request.param)
    monkeypatch.setenv("WSPROXY_RELAY", driver)
    return driver
