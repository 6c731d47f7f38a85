"""Session lifetimes: when a session must end because of its credential or its age. No I/O here.

Three bounds can end an established session from the proxy's side, each at a
frame boundary (the relay places the close frames; this module only computes
*when* and *why*):

- **token expiry** (``routes[].auth.enforce_expiry``): a JWT is checked once,
  at the upgrade, but RFC 7519 §4.1.4 says it "MUST NOT be accepted for
  processing" on or after ``exp``; the proxy holds it to that for the whole
  session. Forward auth may bound a session the same way with a lifetime
  header (``auth.forward.lifetime_from``, seconds from its answer).
- **revocation** (``routes[].auth.revoked_file``): a list of token ids
  (``jti``, RFC 7519 §4.1.7) and subjects; new handshakes that match are
  refused, open sessions that match after a reload are closed.
- **maximum age** (``routes[].max_session_age``).

The rules, so that a batch of sessions opened together does not end together:

- expiry: the close comes at ``exp + leeway + u × min(60 s, 10 % of the
  token's lifetime)``, ``u`` uniform in [0, 1), where the lifetime is ``exp −
  iat`` (or ``exp`` − the time of the upgrade when the token has no usable
  ``iat``). A token that lives an hour ends 0-60 s after its expiry, one that
  lives 10 s ends within 1 s of it. Never before ``exp`` + leeway.
- age: ``max_session_age × (0.9 + 0.2 u)``: ±10 % around the configured age.

Nothing here reads a clock or a random source: ``now`` and ``u`` are passed in.
What this is not: the sweeper that acts on the deadlines (``control.sweeper``
and ``control.lifetime``), nor the JWT verification (``proto.jwt``).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

__all__ = [
    "AGE_JITTER",
    "EXPIRY_JITTER_FRACTION",
    "EXPIRY_JITTER_MAX_S",
    "Deadline",
    "End",
    "age_deadline",
    "expiry_deadline",
    "lifetime_deadline",
    "parse_lifetime",
    "parse_revoked",
    "revocation_keys",
    "revoked_by",
]

#: The expiry jitter never exceeds this many seconds...
EXPIRY_JITTER_MAX_S = 60.0
#: ...nor this share of the token's lifetime.
EXPIRY_JITTER_FRACTION = 0.10
#: ``max_session_age`` is met within ± this share.
AGE_JITTER = 0.10
#: The longest lifetime an auth service may give (ten years); more is a broken answer.
MAX_LIFETIME_S = 10 * 365 * 86400.0

_DECIMAL = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,9})?")


class End(enum.Enum):
    """Why a session's deadline ends it: the close code to the client and the reason (both sides)."""

    TOKEN_EXPIRED = (1008, "token expired")  # RFC 6455 §7.4.1: 1008 policy violation
    REVOKED = (1008, "token revoked")
    LIFETIME = (1012, "session lifetime reached")  # 1012 service restart: reconnect, as after a drain

    @property
    def client_code(self) -> int:
        return self.value[0]

    @property
    def reason(self) -> str:
        return self.value[1]


@dataclass(frozen=True, slots=True)
class Deadline:
    """When (in the caller's clock) and why a session ends."""

    at: float
    end: End

    def earlier(self, other: Deadline | None) -> Deadline:
        """The earlier of the two (``self`` on a tie)."""
        return other if other is not None and other.at < self.at else self


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def expiry_deadline(claims: Mapping[str, object], leeway_s: float, now: float, u: float) -> Deadline | None:
    """The close time of a session whose JWT has ``claims``, in the clock of ``now`` (Unix seconds).

    None when the token has no numeric ``exp`` (``proto.jwt`` refuses those
    at the upgrade anyway). ``u`` in [0, 1) picks the point in the jitter window.
    """
    exp = _number(claims.get("exp"))
    if exp is None:
        return None
    iat = _number(claims.get("iat"))
    lifetime_s = exp - iat if iat is not None and iat < exp else exp - now
    return Deadline(exp + leeway_s + u * _jitter_window_s(lifetime_s), End.TOKEN_EXPIRED)


def lifetime_deadline(lifetime_s: float, now: float, u: float) -> Deadline:
    """A lifetime given by forward auth at ``now``: the same rule, with ``exp = now + lifetime_s``."""
    return Deadline(now + lifetime_s + u * _jitter_window_s(lifetime_s), End.TOKEN_EXPIRED)


def _jitter_window_s(lifetime_s: float) -> float:
    return max(0.0, min(EXPIRY_JITTER_MAX_S, EXPIRY_JITTER_FRACTION * lifetime_s))


def age_deadline(max_age_s: float, started: float, u: float) -> Deadline:
    """``max_session_age`` of a session that started at ``started``, ±10 % by ``u`` in [0, 1)."""
    return Deadline(started + max_age_s * (1 - AGE_JITTER + 2 * AGE_JITTER * u), End.LIFETIME)


def parse_lifetime(value: bytes) -> float:
    """A lifetime header's value: decimal seconds (``3600``, ``0.5``), at most ten years.

    Raises ValueError with what was wrong; the message never quotes the value.
    """
    text = value.decode("ascii", "replace").strip(" \t")
    if not _DECIMAL.fullmatch(text):
        raise ValueError("not a number of seconds")
    seconds = float(text)
    if seconds > MAX_LIFETIME_S:
        raise ValueError("more than ten years")
    return seconds


def parse_revoked(text: str) -> frozenset[str]:
    """A ``revoked_file``: one token id (``jti``) or subject a line.

    Blank lines and lines starting with ``#`` are skipped, and so is the rest of
    a line after whitespace and ``#``. Surrounding whitespace is dropped; an
    entry with whitespace inside is an error naming its line (never its text).
    """
    entries = set()
    for number, line in enumerate(text.splitlines(), start=1):
        entry = re.split(r"\s#", line, maxsplit=1)[0].strip()
        if not entry or entry.startswith("#"):
            continue
        if len(entry.split()) != 1:
            raise ValueError(f"line {number}: expected one token id or subject, got several words")
        if not entry.isprintable():
            raise ValueError(f"line {number}: control characters in the entry")
        entries.add(entry)
    return frozenset(entries)


def revocation_keys(identity: str | None, claims: Mapping[str, object] | None) -> tuple[tuple[str, str], ...]:
    """What a revocation list may name for a session: ``(kind, value)`` pairs.

    The JWT's ``jti`` and ``sub`` (strings or integers), and the identity the
    gate admitted (a static token's name, the JWT's ``identity_claim``, forward
    auth's identity).
    """
    keys: list[tuple[str, str]] = []
    for kind, name in (("jti", "jti"), ("subject", "sub")):
        value = claims.get(name) if claims is not None else None
        if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
            keys.append((kind, str(value)))
    if identity:
        keys.append(("subject", identity))
    return tuple(keys)


def revoked_by(revoked: Collection[str], keys: tuple[tuple[str, str], ...]) -> str | None:
    """Which kind of key (``jti`` or ``subject``) of ``keys`` is on the list, or None."""
    if not revoked:
        return None
    for kind, value in keys:
        if value in revoked:
            return kind
    return None
