"""Where a load reads its YAML files: the disk (recording what it read), or a snapshot of an earlier load (no disk at all).

A config is composed from a main file and the files its ``include:`` names
(``config.compose``). ``ConfigTexts`` is the one place both are read from:

- ``ConfigTexts()`` reads the disk (``config.files.read_file``, UTF-8) and
  expands include patterns with ``glob``, and records both: its
  ``snapshot()`` is then exactly what that load validated, with no second
  read that could differ;
- ``ConfigTexts(snapshot)`` answers from the snapshot only: a load from it
  composes the same tree whatever the files on disk say now (an include
  pattern matches the files it matched then, no more).

Why: with ``workers: N`` the supervisor keeps the snapshot of the config in
effect and every worker composes its config from it, at start, at a restart
and at a reload (``supervisor.slots``, ``supervisor.reloading``), as nginx's
workers get the master's parsed config. The files a config only references
(certificates, token files, JWKS, revoked lists) are not YAML and are not
here: each load reads them from disk, so a certificate renewed in place is
picked up by the next reload.

A ``Snapshot`` is plain data (``to_data``/``from_data``: JSON objects of
strings) so that it travels in a supervisor message. What this is not: a
parser (``config.compose``, ``config.load``) or a guard on reading
(``config.files``).
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wsproxy.config.files import MAX_CONFIG_BYTES, FileRefused, read_file

__all__ = ["MAX_TOTAL_BYTES", "ConfigTexts", "Snapshot"]

#: The YAML files of one config together (UTF-8 bytes), as for one file: a snapshot travels to
#: each worker in one message (``supervisor.messages.MAX_LINE_BYTES``, 64 MiB), and JSON at most
#: triples UTF-8 text (``\uXXXX`` escapes), so 16 MiB always fits.
MAX_TOTAL_BYTES = MAX_CONFIG_BYTES


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The YAML files one load read: what it takes to compose the same config again."""

    path: str  # the main file, as the load was given it
    texts: Mapping[str, str] = field(default_factory=dict)  # every YAML file read (the main one first) → its text
    globs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # each include pattern → the files it matched

    def to_data(self) -> dict[str, Any]:
        """As plain JSON data (a supervisor message carries it)."""
        return {"path": self.path, "texts": dict(self.texts), "globs": {p: list(m) for p, m in self.globs.items()}}

    @classmethod
    def from_data(cls, data: Any) -> Snapshot:
        """The snapshot ``to_data`` gave; ``ValueError`` if ``data`` is not one."""
        if not isinstance(data, dict):
            raise ValueError(f"a config snapshot is a JSON object, got {type(data).__name__}")
        path, texts, globs = data.get("path"), data.get("texts"), data.get("globs")
        if (
            not isinstance(path, str)
            or not isinstance(texts, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in texts.items())
            or not isinstance(globs, dict)
            or not all(isinstance(k, str) and isinstance(v, list) and all(isinstance(m, str) for m in v) for k, v in globs.items())
        ):
            raise ValueError("not a config snapshot (path, texts and globs of strings)")
        return cls(path, dict(texts), {pattern: tuple(matches) for pattern, matches in globs.items()})


class ConfigTexts:
    """The texts of a config's YAML files: from the disk, recorded (no ``snapshot``), or from ``snapshot`` only."""

    def __init__(self, snapshot: Snapshot | None = None) -> None:
        self._given = snapshot
        self._texts: dict[str, str] = {}
        self._globs: dict[str, tuple[str, ...]] = {}
        self._main: str | None = None
        self._total = 0  # bytes of YAML read so far (MAX_TOTAL_BYTES)

    def read(self, path: str) -> str:
        """The text of the YAML file ``path``; ``FileRefused``, ``OSError`` or ``UnicodeDecodeError`` if none."""
        if self._given is not None:
            text = self._given.texts.get(path)
            if text is None:
                raise FileRefused(f"{path} is not in the snapshot of the config in effect")
            return text
        data = read_file(path, MAX_CONFIG_BYTES)
        if self._total + len(data) > MAX_TOTAL_BYTES:
            raise FileRefused(
                f"the config's YAML files would add up to {(self._total + len(data)) / 2**20:.1f} MiB,"
                f" over {MAX_TOTAL_BYTES // 2**20} MiB together"
            )
        text = data.decode("utf-8")
        self._total += len(data)
        if self._main is None:
            self._main = path
        self._texts[path] = text
        return text

    def glob(self, pattern: str) -> tuple[str, ...]:
        """The files an include pattern (with wildcards) matches, sorted."""
        if self._given is not None:
            return self._given.globs.get(pattern, ())
        matches = tuple(sorted(glob.glob(pattern)))
        self._globs[pattern] = matches
        return matches

    def snapshot(self) -> Snapshot:
        """What was read (the given snapshot, when reading from one)."""
        if self._given is not None:
            return self._given
        return Snapshot(self._main or "", dict(self._texts), dict(self._globs))
