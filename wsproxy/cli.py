"""The operator commands of ``wsproxy``: talk to a running proxy through its admin API.

    wsproxy reload  -c FILE                 POST /reload: exit 0 when applied, 1 with the errors
    wsproxy status  -c FILE [--json]        GET /status
    wsproxy drain   -c FILE POOL BACKEND    POST /pools/POOL/backends/BACKEND/drain
    wsproxy undrain -c FILE POOL BACKEND    POST /pools/POOL/backends/BACKEND/undrain
    wsproxy sessions -c FILE [FILTERS] [--json]   GET /sessions (every page)
    wsproxy kick -c FILE (--session ID | --identity NAME) [--code N] [--reason TEXT]
                                            POST /sessions/ID/close or /identities/NAME/close
    wsproxy upgrade -c FILE                 POST /upgrade (workers > 1): exit 0 once the new generation serves

Each reads only the ``admin`` section of FILE (``config.load.load_admin``:
includes and ``${VAR}`` applied, the token read from ``token_file``), so it
reaches the proxy even when the rest of the file has errors. The listener is
found as configured: ``unix:/path``, or ``host:port`` (a wildcard bind is
reached on loopback of its family). Exit status: 0 done, 1 refused or failed
(the reason on stderr), 2 a usage error (argparse).

Also here: ``--version``'s text, and ``check --dump`` (the effective config as
YAML, secrets redacted). This module does no proxying; the commands are plain
blocking HTTP/1.1 (``http.client``), no trio.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import socket
import ssl
import sys
import time
from typing import Any, TextIO
from urllib.parse import quote, urlencode

from . import __version__
from .config.schema import Address, AdminConfig, hostport
from .errors import WsproxyError

#: How long a command waits for the proxy (``reload`` adds the config's timeouts.reload).
REQUEST_TIMEOUT_S = 10.0
#: Where ``-c`` points when not given.
DEFAULT_CONFIG = "/etc/wsproxy/wsproxy.yaml"


class CommandFailed(WsproxyError):
    """A command that could not be done: the message is the one line printed to stderr."""


# -- --version -----------------------------------------------------------------------------------


def version_text() -> str:
    """``wsproxy --version``: the versions that matter in a bug report.

    Built for every command's parser, so trio's version is read from its
    package metadata: importing trio here would load it into ``wsproxy check``.
    """
    from importlib.metadata import version

    from ._mypyc import describe

    lines = [
        f"wsproxy {__version__}",
        f"Python {sys.version.split()[0]} ({sys.implementation.name})",
        f"trio {version('trio')}",
        f"OpenSSL {ssl.OPENSSL_VERSION.removeprefix('OpenSSL ')}",
        describe(),  # the frame scanner (compiled or pure) and the unmasking routine
    ]
    return "\n".join(lines)


# -- the admin client ----------------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


@dataclasses.dataclass(frozen=True)
class AdminTarget:
    """Where the admin API of the proxy that runs FILE listens, and its token."""

    where: str  # for messages: "127.0.0.1:9090" or "unix:/run/wsproxy/admin.sock"
    unix_path: str | None
    host: str | None
    port: int
    token: bytes | None

    @classmethod
    def from_config(cls, path: str) -> AdminTarget:
        from .config.load import load_admin
        from .errors import ConfigErrors

        try:
            admin = load_admin(path)
        except ConfigErrors as exc:
            raise CommandFailed("\n".join(str(error) for error in exc.errors)) from None
        if admin is None:
            raise CommandFailed(f"{path} has no admin section: the admin API is off, so there is nothing to talk to")
        return cls.from_admin(admin, path)

    @classmethod
    def from_admin(cls, admin: AdminConfig, path: str) -> AdminTarget:
        if admin.unix_path is not None:
            return cls(f"unix:{admin.unix_path}", admin.unix_path, None, 0, admin.token)
        assert admin.bind is not None
        if admin.bind.port == 0:
            raise CommandFailed(f"{path}: admin.bind {admin.bind} has port 0: the port the proxy got is not known here")
        host = admin.bind.host
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if ip.is_unspecified:  # 0.0.0.0 or ::: reach it on loopback of the same family
                host = "127.0.0.1" if ip.version == 4 else "::1"
        return cls(hostport(host, admin.bind.port), None, host, admin.bind.port, admin.token)

    def request(
        self, method: str, target: str, timeout_s: float = REQUEST_TIMEOUT_S, body: object = None
    ) -> tuple[int, Any]:
        """(status, the JSON body or the text) of one request; CommandFailed if the proxy cannot be reached."""
        if self.unix_path is not None:
            conn: http.client.HTTPConnection = _UnixConnection(self.unix_path, timeout_s)
        else:
            assert self.host is not None
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        headers = {"Host": self.where if self.unix_path is None else "localhost", "Connection": "close"}
        if self.token is not None:
            headers["Authorization"] = "Bearer " + self.token.decode("utf-8", "replace")
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, target, body=data, headers=headers)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
            raise CommandFailed(f"cannot reach the admin API at {self.where}: {reason} (is wsproxy running?)") from None
        finally:
            conn.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(body)
        return response.status, body.decode("utf-8", "replace").strip()


def _refused(target: AdminTarget, status: int, body: Any) -> CommandFailed:
    if status == 401:
        return CommandFailed(f"the admin API at {target.where} refused the token (401): check admin.token_file")
    detail = body.get("error", body) if isinstance(body, dict) else body
    return CommandFailed(f"the admin API at {target.where} answered {status}: {detail}")


# -- the commands --------------------------------------------------------------------------------


def reload(path: str, out: TextIO) -> int:
    """Ask the running proxy to reload its config file and wait for the outcome."""
    target = AdminTarget.from_config(path)
    timeout_s = REQUEST_TIMEOUT_S + _reload_timeout_s(path)
    status, body = target.request("POST", "/reload", timeout_s)
    if status == 200 and isinstance(body, dict):
        print(f"wsproxy: reloaded: config generation {body.get('generation')}", file=out)
        return 0
    if status in (409, 503) and isinstance(body, dict):
        for error in body.get("errors", []):
            print(error, file=sys.stderr)
        print(f"wsproxy: reload refused ({len(body.get('errors', []))} error(s)); the old config keeps serving", file=sys.stderr)
        return 1
    raise _refused(target, status, body)


def upgrade(path: str, out: TextIO) -> int:
    """Ask the supervisor to start a new generation of processes and wait until it serves."""
    target = AdminTarget.from_config(path)
    status, body = target.request("POST", "/upgrade", REQUEST_TIMEOUT_S + 60)
    if status == 200 and isinstance(body, dict):
        print(f"wsproxy: upgraded: the new supervisor is pid {body.get('pid')}; the old workers keep their sessions", file=out)
        return 0
    if status == 409 and isinstance(body, dict):
        for error in body.get("errors", []):
            print(error, file=sys.stderr)
        print("wsproxy: upgrade failed; the running generation keeps serving", file=sys.stderr)
        return 1
    if status == 404:
        raise CommandFailed(f"the proxy at {target.where} has no supervisor to upgrade (workers: 1); restart it instead")
    raise _refused(target, status, body)


def _reload_timeout_s(path: str) -> float:
    """timeouts.reload of FILE if it loads, else the default (the proxy's own may differ: it is a bound only)."""
    from .config.load import load_config
    from .config.schema import TimeoutsConfig
    from .errors import ConfigErrors

    try:
        return load_config(path).timeouts.reload_s
    except ConfigErrors:
        return TimeoutsConfig().reload_s


def status(path: str, out: TextIO, as_json: bool) -> int:
    target = AdminTarget.from_config(path)
    code, body = target.request("GET", "/status")
    if code != 200 or not isinstance(body, dict):
        raise _refused(target, code, body)
    if as_json:
        print(json.dumps(body, indent=2), file=out)
        return 0
    print(
        f"generation {body['generation']}, {body['sessions']} session(s), {body['connections']} connection(s),"
        f" reloads {body['reloads']} ({body['reload_failures']} failed)",
        file=out,
    )
    if body.get("last_reload_error"):
        print(f"last reload error: {body['last_reload_error']}", file=out)
    for worker in body.get("workers", []):  # workers > 1
        print(
            f"worker {worker['slot']}: pid {worker['pid']} {worker['state']}, {worker['sessions']} session(s),"
            f" restarts {worker['restarts']}",
            file=out,
        )
    retiring = body.get("retiring")  # an upgrade's window: the old generation still has sessions
    if isinstance(retiring, dict):
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(retiring.get("deadline_unix") or 0)))
        print(
            f"retiring generation: pid {retiring.get('pid')}, {retiring.get('workers')} worker(s),"
            f" {retiring.get('sessions')} session(s), closed by {until} at the latest",
            file=out,
        )
    for listener in body.get("listeners", []):
        print(f"listener {listener['name']}: {', '.join(listener['addresses'])}{' tls' if listener['tls'] else ''}", file=out)
    for name, pool in body.get("pools", {}).items():
        print(f"pool {name} ({pool['balance']}):", file=out)
        for b in pool["backends"]:
            state = "draining" if b["draining"] else ("ejected" if b["ejected"] else b["health"])
            source = " (dns)" if b.get("source") == "dns" else ""
            print(f"  {b['address']:<24} {state:<9} active={b['active']} total={b['total']}{source}", file=out)
        for b in pool.get("removed", []):
            print(f"  {b['address']:<24} {'draining':<9} active={b['active']} total={b['total']} (left the pool)", file=out)
    return 0


def drain(path: str, pool: str, backend: str, undo: bool, out: TextIO) -> int:
    target = AdminTarget.from_config(path)
    action = "undrain" if undo else "drain"
    code, body = target.request("POST", f"/pools/{quote(pool, safe='')}/backends/{quote(backend, safe='')}/{action}")
    if code == 404 and isinstance(body, dict):
        raise CommandFailed(f"no backend {backend} in pool {pool} of the running config")
    if code != 200 or not isinstance(body, dict):
        raise _refused(target, code, body)
    now = "draining" if body["draining"] else "not draining"
    print(f"wsproxy: {pool} {backend}: {now}{'' if body['changed'] else ' (already)'}", file=out)
    return 0


#: ``wsproxy sessions`` filters, as ``GET /sessions`` names them.
SESSION_FILTERS = ("route", "pool", "backend", "identity", "peer")
#: Sessions asked for per request while following ``next``: the API's maximum.
SESSIONS_PAGE = 1000


def sessions(path: str, out: TextIO, filters: dict[str, str], as_json: bool) -> int:
    """List the running proxy's sessions (every page), as a table or as JSON."""
    target = AdminTarget.from_config(path)
    records: list[dict[str, Any]] = []
    unanswered: set[int | str] = set()  # workers > 1: workers that did not answer in time (a retiring one: a string)
    cursor: str | None = None
    while True:
        query = {**filters, "limit": str(SESSIONS_PAGE), **({"cursor": cursor} if cursor else {})}
        code, body = target.request("GET", "/sessions?" + urlencode(query))
        if code != 200 or not isinstance(body, dict):
            raise _refused(target, code, body)
        records += body["sessions"]
        unanswered.update(body.get("unanswered") or ())
        cursor = body["next"]
        if not cursor:
            break
    _warn_unanswered(unanswered, "their sessions are not listed")
    if as_json:
        print(json.dumps({"sessions": records}, indent=2), file=out)
        return 0
    if not records:
        print("no sessions" + (" match" if filters else ""), file=out)
        return 0
    head = ("ID", "PEER", "IDENTITY", "ROUTE", "POOL", "BACKEND", "AGE", "UP", "DOWN")
    rows = [
        (
            r["id"], r["peer"], r["identity"] if r["identity"] is not None else "-", r["route"], r["pool"],
            r["backend"], _age(r["age_s"]), f"{_bytes(r['up_bytes'])}/{r['up_msgs']}",
            f"{_bytes(r['down_bytes'])}/{r['down_msgs']}",
        )  # fmt: skip
        for r in records
    ]
    widths = [max(len(str(row[i])) for row in (head, *rows)) for i in range(len(head))]
    for row in (head, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
    print(f"{len(records)} session(s); UP and DOWN are bytes/messages", file=out)
    return 0


def _warn_unanswered(slots: set[int | str], consequence: str) -> None:
    """Name the workers that did not answer: slots, then an upgrade's retiring generation (``retiring/SLOT``)."""
    if slots:
        names = [str(s) for s in sorted(s for s in slots if isinstance(s, int))] + sorted(s for s in slots if isinstance(s, str))
        print(f"wsproxy: worker(s) {', '.join(names)} did not answer in time: {consequence}", file=sys.stderr)


def _age(seconds: float) -> str:
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.0f}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f}{unit}"


def kick(
    path: str, out: TextIO, *, session: str | None, identity: str | None, code: int | None, reason: str | None
) -> int:
    """Close one session, or every session of an identity, through the admin API."""
    target = AdminTarget.from_config(path)
    body: dict[str, object] = {}
    if code is not None:
        body["code"] = code
    if reason is not None:
        body["reason"] = reason
    if session is not None:
        where = f"/sessions/{quote(session, safe='')}/close"
    else:
        assert identity is not None
        where = f"/identities/{quote(identity, safe='')}/close"
    status_code, answer = target.request("POST", where, body=body)
    if status_code == 404 and session is not None:
        raise CommandFailed(f"no session {session} in the running proxy (it may have ended)")
    if status_code == 400 and isinstance(answer, dict):
        raise CommandFailed(f"refused: {answer.get('error')}")
    if status_code != 200 or not isinstance(answer, dict):
        raise _refused(target, status_code, answer)
    closed = answer["closed"]
    _warn_unanswered(set(answer.get("unanswered") or ()), "their sessions were not closed")
    if session is not None:
        print(f"wsproxy: session {session}: " + ("closing" if closed else "already closing"), file=out)
    else:
        print(f"wsproxy: identity {identity}: closing {closed} session(s)", file=out)
    return 0


# -- check --dump --------------------------------------------------------------------------------

REDACTED = "<redacted>"
#: Fields that hold secrets, by dataclass field name: printed as REDACTED.
SECRET_FIELDS = frozenset({"token", "secret", "sha256", "key_material"})


def dump(config: object) -> str:
    """The effective config as YAML: every field with its default, secrets redacted.

    The names are the schema's (``idle_s``: seconds, ``*_bytes``: bytes), so
    this shows what wsproxy understood, not the file as written.
    """
    import yaml

    return yaml.safe_dump(_plain(config), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _plain(value: object, name: str = "") -> object:
    if name in SECRET_FIELDS and value not in (None, (), b"", ""):
        return REDACTED
    if isinstance(value, Address):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), f.name)
            for f in dataclasses.fields(value)
            if f.repr or f.name in SECRET_FIELDS  # objects built at load time (SSL contexts) are not config
        }
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, bytes):
        return REDACTED
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
