"""Reading the files a config names, so that reading can neither hang nor exhaust memory.

Token files, JWT keys and JWKS, secrets, the admin token, certificates, keys
and CA bundles, and the config file itself are read through ``read_file``:

- the file is opened with ``O_NONBLOCK``, so opening a FIFO that nobody writes
  returns at once instead of blocking the loader (and the reload) for ever;
- ``fstat`` on the open descriptor must say it is a regular file: a FIFO, a
  device (``/dev/zero``, ``/dev/urandom``), a socket or a directory is refused;
- its size must be at most a cap (``MAX_FILE_BYTES``, or ``MAX_CA_BUNDLE_BYTES``
  for CA bundles, ``MAX_CONFIG_BYTES`` for the YAML), and at most cap + 1 bytes
  are ever read, so a file that grows while it is read is refused too.

``check_file`` does the same checks by ``stat`` for the files that ``ssl``
reads by path itself (``load_cert_chain``, ``load_verify_locations``).

What this is not: a guard against a file system that stalls (a dead NFS
server). The reload runs the loader in a thread under a deadline for that
(``timeouts.reload``). No config logic here; ``FileRefused`` carries a message
that the config reader places at the key's position.
"""

from __future__ import annotations

import os
import stat
from typing import Final

from ..errors import WsproxyError

__all__ = [
    "MAX_CA_BUNDLE_BYTES",
    "MAX_CONFIG_BYTES",
    "MAX_FILE_BYTES",
    "FileRefused",
    "check_file",
    "read_file",
]

#: Tokens, keys, certificate chains, JWKS, secrets: far below this in practice.
MAX_FILE_BYTES: Final = 1024 * 1024
#: CA bundles (the system's is about 200 KiB; a large private PKI may be a few MiB).
MAX_CA_BUNDLE_BYTES: Final = 16 * 1024 * 1024
#: The YAML config file itself.
MAX_CONFIG_BYTES: Final = 16 * 1024 * 1024

_OPEN_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class FileRefused(WsproxyError):
    """The file exists but is not something the config may read (type or size)."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a plain file"  # pragma: no cover - doors, whiteouts


def _size_text(size_bytes: int) -> str:
    if size_bytes % (1024 * 1024) == 0:
        return f"{size_bytes // (1024 * 1024)} MiB"
    return f"{size_bytes} bytes"


def _check_stat(path: str, status: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(status.st_mode):
        raise FileRefused(f"{path} is not a regular file ({_kind(status.st_mode)})")
    if status.st_size > max_bytes:
        raise FileRefused(f"{path} is {status.st_size} bytes, over the limit of {_size_text(max_bytes)}")


def read_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The whole content of the regular file at ``path``, at most ``max_bytes``.

    Raises ``FileRefused`` when it is not a regular file or is too large, and
    ``OSError`` when it cannot be opened or read.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        _check_stat(path, os.fstat(fd), max_bytes)
        chunks = []
        left = max_bytes + 1  # one byte more than allowed tells a file that grew
        while left > 0:
            chunk = os.read(fd, min(left, 1024 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise FileRefused(f"{path} is over the limit of {_size_text(max_bytes)}")
        return data
    finally:
        os.close(fd)


def check_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> None:
    """Refuse (``FileRefused``) a path that names something other than a regular file of at most ``max_bytes``.

    For files another library opens by path. A missing or unreadable file is
    not reported here (``OSError`` is swallowed): the library that opens it
    says so in its own words.
    """
    try:
        status = os.stat(path)
    except OSError:
        return
    _check_stat(path, status, max_bytes)
