"""Moved to ``tests.kit.servers``; this name stays for branches written before the kit."""

from tests.kit.servers import *  # noqa: F401,F403
from tests.kit.ws import UPGRADE_REQUEST  # noqa: F401
