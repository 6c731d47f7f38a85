"""The messages between the supervisor and a worker: plain data, one JSON object per line. No I/O here.

Every message is a JSON object with a ``"t"`` (its type). Listening sockets
travel beside a message as ``SCM_RIGHTS`` (``supervisor.ipc``); the message
says how many belong to which listener (``"listeners": {"NAME": count}``), in
the order they were sent.

Supervisor → worker:

====================  ====================================================================
``config``            the first message: ``config``, the snapshot of the YAML files of the
                      config in effect (``config.snapshot.Snapshot.to_data``: ``path``,
                      ``texts`` {file: text}, ``globs`` {include pattern: [files]}); the
                      worker composes its config from it, never from the YAML on disk
``start``             serve: ``slot``, ``listeners`` (+ fds), ``workers``, ``generation``, ``health``
``prepare``           compose the new config from ``config`` (its snapshot, as the supervisor
                      validated it) and report (``round``, new ``listeners`` + fds); the
                      worker loads in a task of its own and keeps reading other messages
``commit``            apply what ``round`` prepared
``abandon``           drop what ``round`` prepared (or will have, if it is still loading)
``health``            the verdicts of the supervisor's checks: ``backends``, ``changes``
``drain``             ``pool``, ``backend``, ``undo``
``adopt``/``release`` accept on another slot's sockets (its worker is down) / stop
``retire``            stop accepting; keep sessions up to ``timeout_s``, then shut down
``ask``               the sessions API: ``id``, ``what`` (``sessions`` + ``query``, ``close_session``
                      + ``conn``, ``close_identity`` + ``identity``; closes with ``order``, ``by``)
``shutdown``          SIGTERM's graceful shutdown (``now``: close everything at once)
====================  ====================================================================

Worker → supervisor: ``hello`` (``pid``, ``version``, ``fingerprint``, or ``errors``),
``ready``, ``prepared`` / ``committed`` (``round``, ``ok``, ``errors``),
``report`` (``status``, ``metrics``: once a second), ``answer`` (``id``,
``data``: what ``supervisor.fanout`` says a worker answers).

Between an upgrade's two supervisors, over the upgrade channel
(``supervisor.upgrade``), the same way:

====================  ====================================================================
``upgrade_started``   new → old: it runs (``pid``); its workers are starting
``upgrade_ready``     new → old: every new worker serves (``pid``); hand over
``admin_released``    old → new: the admin listener is closed, bind it; the old generation retires
``retiring``          old → new, once a second until it exits: ``pid``, ``sessions``, ``workers``,
                      ``deadline_unix`` (``merge.retiring_summary``; ``/status``'s ``retiring``),
                      ``metrics`` (its workers' metrics merged, text format, without the
                      supervisor's own series; the workers that exited count with the
                      counters of their last report: ``/metrics``'s series labelled
                      ``generation="retiring"``, ``merge.merge_families``); the sessions of
                      a generation retiring behind it are in ``sessions``, its metrics are not
                      (they would carry the same labels)
``ask``               new → old: the sessions API, as to a worker, plus ``timeout_s`` (the old
                      supervisor asks its own retiring workers within it)
``answer``            old → new: ``id``, ``data`` (``fanout.forwarded``: a worker's answer, plus
                      ``unanswered``, and ``timed_out`` when none of its workers answered)
====================  ====================================================================
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import WsproxyError

#: A message as it travels: a JSON object whose "t" is its type.
Message = dict[str, Any]

#: The longest line accepted (a status report of a large config fits many times over).
MAX_LINE_BYTES = 64 * 1024 * 1024


class ProtocolError(WsproxyError):
    """The peer sent something that is not a message (a bug, or not a wsproxy process)."""


def encode(message: Message) -> bytes:
    """One line: the JSON of ``message`` and a newline (JSON escapes every newline inside)."""
    if not isinstance(message.get("t"), str):
        raise ValueError(f"a message needs a type: {message!r}")
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


class LineDecoder:
    """Bytes in, messages out: ``feed`` returns every complete message so far."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._buffer = bytearray()
        self._max = max_line_bytes

    def feed(self, data: bytes) -> list[Message]:
        self._buffer += data
        messages: list[Message] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._max:
                    raise ProtocolError(f"message over {self._max} bytes")
                return messages
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            try:
                message = json.loads(line)
            except ValueError as exc:
                raise ProtocolError(f"not JSON: {exc}") from None
            if not isinstance(message, dict) or not isinstance(message.get("t"), str):
                raise ProtocolError(f"not a message: {line[:80]!r}")
            messages.append(message)
