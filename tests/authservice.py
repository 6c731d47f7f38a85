"""Moved to ``tests.kit.authservice``; this name stays for branches written before the kit."""

from tests.kit.authservice import *  # noqa: F401,F403
