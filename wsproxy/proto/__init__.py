"""Sans-I/O protocol logic: the stages a connection passes through. No trio here.

The modules listed in ``wsproxy._mypyc`` (the frame scanner) are loaded here,
compiled when their mypyc extension imports and from their source otherwise.
"""

from __future__ import annotations

from .._mypyc import load_listed

load_listed(__name__)
