"""Moved to ``tests.kit.ws``; this name stays for branches written before the kit."""

from tests.kit.ws import *  # noqa: F401,F403
