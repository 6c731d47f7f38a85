"""Parsers for the scalar value types of a config file: durations, sizes, addresses, shares per time.

Each parser takes the text an operator wrote and returns the value in the unit
the schema uses (seconds, bytes, :class:`~wsproxy.config.schema.Address`), or
raises :exc:`ValueError` with a message that quotes what it was given::

    >>> parse_duration("1m30s")
    90.0
    >>> parse_size("64KiB")
    65536
    >>> parse_address("[::1]:9000", allow_port_zero=False)
    Address(host='::1', port=9000)
    >>> parse_fraction_rate("1%/min") * 60
    0.01

This module knows nothing about YAML, file positions or config paths; ``load.py``
adds those when it turns a :exc:`ValueError` into a ``ConfigError``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from decimal import Decimal

from wsproxy.config.schema import Address

__all__ = [
    "DURATION_EXAMPLES",
    "SIZE_EXAMPLES",
    "is_host_name",
    "parse_address",
    "parse_duration",
    "parse_fraction_rate",
    "parse_size",
    "quote",
]


def quote(text: str) -> str:
    """``text`` in double quotes, with control characters escaped, for messages."""
    return json.dumps(text, ensure_ascii=False)


# --- durations ---------------------------------------------------------------

#: Seconds per unit, from the largest unit to the smallest.
_DURATION_UNITS = {
    "d": Decimal(86400),
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
}
_DURATION_RANK = {unit: rank for rank, unit in enumerate(_DURATION_UNITS)}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|[dhms])")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
_NUMBER = re.compile(r"[-+]?[0-9]+(?:\.[0-9]*)?")

#: What a duration looks like, for messages ("expected ..., got ...").
DURATION_EXAMPLES = 'a duration like "250ms", "10s", "5m", "1h"'


def parse_duration(text: str) -> float:
    """Seconds in a duration: ``"250ms"``, ``"1.5s"``, ``"5m"``, ``"1h"``, ``"1d"``, ``"1m30s"``.

    A compound duration lists its units from the largest to the smallest, each at
    most once (``"1h30m"``, not ``"30m1h"``). A number without a unit is an error,
    because ``idle: 600`` could mean seconds or milliseconds. Zero is accepted here;
    whether it makes sense is the caller's decision.
    """
    if _NUMBER.fullmatch(text):
        raise ValueError(f"a duration needs a unit (ms, s, m, h or d), got {quote(text)}")
    if not _DURATION.fullmatch(text):
        raise ValueError(f"expected {DURATION_EXAMPLES}, got {quote(text)}")
    total = Decimal(0)
    previous_rank = -1
    for number, unit in _DURATION_PART.findall(text):
        rank = _DURATION_RANK[unit]
        if rank <= previous_rank:
            order = "units in a duration go from the largest to the smallest, each once"
            raise ValueError(f"{order}, got {quote(text)}")
        previous_rank = rank
        total += Decimal(number) * _DURATION_UNITS[unit]
    return float(total)


# --- shares per time ---------------------------------------------------------

_RATE_UNIT_S = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_FRACTION_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*%\s*/\s*(s|m|min|h)")


def parse_fraction_rate(text: str) -> float:
    """``"1%/min"`` → 0.01 / 60: a share of a pool's sessions per second (``pools.NAME.rebalance.rate``).

    Units: ``s``, ``m`` or ``min``, ``h``. More than 0 and at most 100 %.
    ValueError says what was expected and what was seen.
    """
    match = _FRACTION_RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f'expected a share of sessions per time like "1%/min", "0.5%/s" or "10%/h", got {text!r}')
    percent = float(match[1])
    if not 0 < percent <= 100:
        raise ValueError(f"the share must be more than 0 % and at most 100 %, got {text!r}")
    return percent / 100 / _RATE_UNIT_S[match[2]]


# --- sizes -------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_SIZE = re.compile(r"([0-9]+)(B|KiB|MiB|GiB)?")
_DECIMAL_SIZE = re.compile(r"[0-9]+\s*[kKmMgG][bB]?")

#: What a size looks like, for messages ("expected ..., got ...").
SIZE_EXAMPLES = 'a size like 65536, "64KiB", "16MiB", "1GiB"'


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"65536"``, ``"512B"``, ``"64KiB"``, ``"16MiB"`` or ``"1GiB"``.

    Units are binary (1 KiB = 1024 bytes). ``"64KB"`` is refused rather than
    guessed, because it means 64000 to some readers and 65536 to others.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        hint = " (units are binary: KiB, MiB, GiB)" if _DECIMAL_SIZE.fullmatch(text) else ""
        raise ValueError(f"expected {SIZE_EXAMPLES}, got {quote(text)}{hint}")
    number, unit = match.groups()
    return int(number) * _SIZE_UNITS[unit or ""]


# --- host names and addresses ------------------------------------------------

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)
_IPV4_LIKE = re.compile(r"[0-9.]+")


def is_host_name(text: str) -> bool:
    """Whether ``text`` is a DNS name: dot-separated labels of letters, digits and
    inner hyphens (RFC 1123 §2.1), at most 253 characters, with a top label that is
    not all digits (RFC 3696 §2), so that ``"10.0.0"`` is not mistaken for a name.
    """
    labels = text.split(".")
    return (
        len(text) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _parse_host(host: str, text: str) -> str:
    """The normalized form of an unbracketed host: an IPv4 literal or a lower-cased DNS name."""
    if _IPV4_LIKE.fullmatch(host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"invalid IPv4 address {quote(host)} in {quote(text)}") from None
    if not is_host_name(host):
        raise ValueError(f"invalid host {quote(host)} in {quote(text)}")
    return host.lower()


def _parse_port(port: str, text: str, allow_port_zero: bool) -> int:
    if not port.isascii() or not port.isdigit():
        raise ValueError(f"invalid port {quote(port)} in {quote(text)}")
    number = int(port)
    if number == 0 and not allow_port_zero:
        only = "port 0 is only allowed for listener binds"
        raise ValueError(f"port must be in 1..65535, got 0 ({only})")
    if number > 65535:
        raise ValueError(f"port must be in {0 if allow_port_zero else 1}..65535, got {number}")
    return number


def parse_address(text: str, *, allow_port_zero: bool) -> Address:
    """The :class:`Address` in ``"127.0.0.1:8080"``, ``"[::1]:9000"`` or ``"backend.lan:9000"``.

    IPv6 literals must be in brackets, because their colons would make the port
    ambiguous. The host is normalized (IPv6 compressed, names lower-cased), so
    that equal endpoints compare equal. Port 0 asks the kernel for a free port,
    which only makes sense for a listener: pass ``allow_port_zero=True`` there.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f'expected "[host]:port", got {quote(text)}')
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"invalid IPv6 address {quote(host)} in {quote(text)}") from None
        port = rest[1:]
    else:
        colons = text.count(":")
        if colons == 0:
            raise ValueError(f'expected "host:port", got {quote(text)}')
        if colons > 1:
            brackets = 'an IPv6 address needs brackets, like "[::1]:9000"'
            raise ValueError(f"{brackets}, got {quote(text)}")
        host, _, port = text.partition(":")
        if not host:
            every = f'to listen on every address, write "0.0.0.0{text}" or "[::]{text}"'
            raise ValueError(f"missing host in {quote(text)} ({every})")
        host = _parse_host(host, text)
    return Address(host, _parse_port(port, text, allow_port_zero))
