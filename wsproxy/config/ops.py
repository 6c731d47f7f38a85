"""The operations keys: route keepalive, shutdown, the admin listener, logging, workers and upgrades.

The admin token is read from its file here, at load time, like every other
file a config names. A TCP admin listener off loopback needs the token, or an
explicit ``insecure_no_token: true``: without either, any host that can reach
the port could drain the backends.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Collection
from dataclasses import replace

from wsproxy.config.durations import quote
from wsproxy.config.reader import At, Reader, given
from wsproxy.config.schema import AdminConfig, KeepaliveConfig, LogConfig, ShutdownConfig, UpgradeConfig

#: The most worker processes ``workers`` accepts.
MAX_WORKERS = 256
#: The smallest admin token accepted.
MIN_TOKEN_BYTES = 16


def keepalive(r: Reader, at: At | None) -> KeepaliveConfig | None:
    fields = r.fields(at, optional=("interval", "timeout"), what="a keepalive mapping (interval, timeout)", null_is_empty=True)
    if fields is None:
        return None
    return KeepaliveConfig(
        **given(interval_s=r.duration(fields.get("interval")), timeout_s=r.duration(fields.get("timeout")))
    )


def shutdown(r: Reader, at: At | None) -> ShutdownConfig | None:
    fields = r.fields(at, optional=("timeout", "spread"), what="a shutdown mapping (timeout, spread)", null_is_empty=True)
    if fields is None:
        return None
    config = ShutdownConfig(
        **given(timeout_s=r.duration(fields.get("timeout")), spread_s=r.duration_or_zero(fields.get("spread")))
    )
    if config.spread_s > config.timeout_s:
        r.error(at, f"spread ({config.spread_s:g}s) cannot be longer than timeout ({config.timeout_s:g}s)")  # type: ignore[arg-type]
    return config


def is_loopback_host(host: str) -> bool:
    """``localhost``, or an IP literal in 127.0.0.0/8 or ``::1`` (a DNS name other than localhost is not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin(r: Reader, at: At | None, pool_names: Collection[str] | None = None) -> AdminConfig | None:
    fields = r.fields(
        at, required=("bind",), optional=("token_file", "insecure_no_token", "health_needs_token", "ready_pools"),
        what="an admin mapping (bind, token_file, insecure_no_token, health_needs_token, ready_pools)",
    )
    if fields is None:
        return None
    bind_at = fields.get("bind")
    text = r.text(bind_at, '"host:port" or "unix:/path"')
    token = None
    read = r.read(fields.get("token_file"))
    if read is not None:
        token = read[1].strip()
        if len(token) < MIN_TOKEN_BYTES:
            r.error(fields["token_file"], f"the token in {read[0]} is {len(token)} bytes; at least {MIN_TOKEN_BYTES} are needed")
            token = None
    insecure = r.boolean(fields.get("insecure_no_token")) or False
    health_needs_token = r.boolean(fields.get("health_needs_token")) or False
    ready_pools = r.strings(fields.get("ready_pools"), "pool names")
    if ready_pools is not None and pool_names is not None:
        for item, name in zip(r.items(fields["ready_pools"], "pool names") or [], ready_pools):
            if name not in pool_names:
                r.error(item, f"ready_pools names pool {quote(name)}, which is not defined")
    if bind_at is None or text is None:
        return None
    token_file = read[0] if read else None
    common = AdminConfig(
        token_file=token_file, token=token, insecure_no_token=insecure,
        health_needs_token=health_needs_token, ready_pools=ready_pools,
    )
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            r.error(bind_at, f'expected "unix:" and an absolute path, got {quote(text)}')
            return None
        return replace(common, unix_path=path)
    address = r.address(bind_at, allow_port_zero=True)
    if address is None:
        return None
    if not is_loopback_host(address.host) and "token_file" not in fields and not insecure:
        r.error(
            bind_at,
            f"{address} is not a loopback address: anyone who reaches it could drain backends;"
            " set token_file, bind 127.0.0.1, ::1 or a unix socket, or set insecure_no_token: true",
        )
        return None
    return replace(common, bind=address)


#: ``log.sessions``: which of a session's two info lines are written
SESSION_LINES = ("both", "close", "none")


def log(r: Reader, at: At | None) -> LogConfig | None:
    fields = r.fields(
        at, optional=("format", "level", "sessions"), what="a log mapping (format, level, sessions)", null_is_empty=True
    )
    if fields is None:
        return None
    return LogConfig(
        **given(
            format=r.choice(fields.get("format"), ("text", "json"), "log format"),
            level=r.choice(fields.get("level"), ("debug", "info", "warning", "error"), "log level"),
            sessions=r.choice(fields.get("sessions"), SESSION_LINES, "log sessions"),
        )
    )


def workers(r: Reader, at: At | None) -> int | None:
    """``workers: N`` (1..MAX_WORKERS) or ``auto``: the CPUs this process may use (``sched_getaffinity``)."""
    if at is None:
        return None
    if r.text(at, f'an integer in 1..{MAX_WORKERS} or "auto"') == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    return r.integer(at, 1, MAX_WORKERS)


def upgrade(r: Reader, at: At | None) -> UpgradeConfig | None:
    fields = r.fields(at, optional=("timeout",), what="an upgrade mapping (timeout)", null_is_empty=True)
    if fields is None:
        return None
    return UpgradeConfig(**given(timeout_s=r.duration(fields.get("timeout"))))
