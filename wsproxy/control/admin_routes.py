"""The admin API's routes: what each request gets (sans-I/O but for the App's calls and the log).

Routes (everything else is 404):

- ``GET /``: the live status page, and ``GET /static/FILE`` its stylesheet and
  script: files shipped in the package (``control/status_page/``), read once,
  served with their media type and ``Content-Security-Policy: default-src
  'self'`` (no inline script or style; the page only talks to this listener).
  These answer without the token, as they hold no data: the page asks for the
  token when ``/status`` answers 401, and keeps it in the tab's memory only.
  ``GET /favicon.ico``, which browsers ask for by themselves, is 204.
- ``GET /metrics``: the Prometheus text format, or OpenMetrics when ``Accept`` asks
  for it (``AdminApp.render_metrics``).
- ``GET /status``: the JSON document ``AdminApp.status`` builds.
- ``GET /healthz``: 200 ``ok`` while the process serves (liveness).
- ``GET /ready``: 200 when ready for new clients, else 503; both with the JSON
  ``{"ready", "reasons", "pools"}`` (``control.ready``). These two answer
  without the token unless ``admin.health_needs_token: true``, so that a
  Kubernetes probe or an L4 balancer can use them.
- ``POST /reload``: the same reload as SIGHUP, waited for: 200
  ``{"applied": true, "generation"}``, or 409 ``{"applied": false,
  "errors": [...]}`` (the old config keeps serving); 503 while shutting down.
  ``wsproxy reload`` calls it.
- ``POST /pools/NAME/backends/ADDRESS/drain`` and ``.../undrain``: ADDRESS is
  percent-decoded (``127.0.0.1%3A9001`` or ``127.0.0.1:9001``, ``[::1]:9001``);
  the answer is ``{"pool", "backend", "draining", "changed"}``, or 404 when the
  pool or backend is unknown. Each is logged at INFO.
- ``GET /sessions``: the established sessions, filtered and paged
  (``control.sessions``: ``route``, ``pool``, ``backend``, ``identity``,
  ``peer``, ``limit``, ``cursor``; 400 for anything else), as
  ``{"sessions": [...], "next": CURSOR | null}``.
- ``POST /sessions/ID/close`` and ``POST /identities/IDENTITY/close``: close
  one session (404 when there is no such session) or every session of an
  identity, with the optional JSON body ``{"code", "reason"}`` (400 when
  invalid; default 1008); the answer is ``{"closed": N}``
  (``control.session_admin``, which logs each close).
  With ``workers`` > 1 the supervisor answers these three by asking its
  workers (``SessionsAcross``, ``supervisor.fanout``): the same answers, plus
  ``"unanswered": [SLOT...]``, the workers that did not answer in time (504
  when none did; during an upgrade's window the retiring generation is asked
  too, and named ``"retiring"`` or ``"retiring/SLOT"``).

``HEAD`` is answered wherever ``GET`` is. A wrong method gets 405 with
``Allow``. When a token is set, every request but the page's needs
``Authorization: Bearer <token>`` (compared in constant time; the health
endpoints only when ``health_needs_token``), else 401 with
``WWW-Authenticate: Bearer`` (RFC 6750 §3), logged at WARNING with the peer and
the path (never the token).

Before any of that, ``admin_policy.check_request`` decides whether a browser
could have been made to send the request: a Host that does not name this
listener gets 421 (DNS rebinding), a state-changing request from another
origin 403 (cross-site request forgery); a control character in a decoded
path segment gets 400. Each refusal is logged with its reason; every value
from the request is written with ``log.field``, so none can forge a line.

This module is not HTTP (``control.admin_http`` reads requests and writes
answers), nor the App (``AdminApp`` is what it calls).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Protocol

import h11

from ..balance.registry import Registry
from ..config.schema import AdminConfig
from ..log import field as logged
from ..log import log_event
from .admin_policy import AdminSite, Refusal, check_request, path_segments
from .metrics import Metrics
from .session_admin import SessionControl
from .sessions import CloseOrder, SessionQuery, parse_close_body, parse_query, select

# One logger for everything the admin listener does, so an operator follows one name.
log = logging.getLogger("wsproxy.control.admin")

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_ACTIONS = {"drain": True, "undrain": False}  # action → draining afterwards

#: The status page's files (``GET /`` is ``index.html``, ``GET /static/NAME`` the others), by suffix.
PAGE_PACKAGE = "wsproxy.control"
PAGE_FOLDER = "status_page"
PAGE_MEDIA_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
}
#: On the page and its files: nothing inline, nothing from elsewhere, never inside a frame.
PAGE_HEADERS = [
    (b"Content-Security-Policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Referrer-Policy", b"no-referrer"),
]


class SessionsAcross(Protocol):
    """The sessions API of a supervisor of ``workers`` > 1: it asks the workers, so each call awaits.

    Each returns (HTTP status, JSON body) (``supervisor.fanout`` decides them).
    """

    async def list_sessions(self, query: SessionQuery) -> tuple[int, dict[str, object]]: ...

    async def close_session(self, conn_id: str, order: CloseOrder, *, by: str) -> tuple[int, dict[str, object]]: ...

    async def close_identity(self, identity: str, order: CloseOrder, *, by: str) -> tuple[int, dict[str, object]]: ...


class AdminApp(Protocol):
    """What the admin server needs from the application (``wsproxy.app.App``)."""

    metrics: Metrics
    registry: Registry

    @property
    def session_control(self) -> SessionControl | SessionsAcross:
        """``GET /sessions`` and the close routes: one process's sessions, or a supervisor's workers'."""
        ...

    def status(self) -> dict[str, object]:
        """The JSON body of ``GET /status``."""
        ...

    def drain_backend(self, pool: str, address: str) -> bool | None:
        """None: no such pool or backend; True: draining now; False: it already was."""
        ...

    def undrain_backend(self, pool: str, address: str) -> bool | None:
        """None: no such pool or backend; True: no longer draining; False: it was not."""
        ...

    def render_metrics(self, accept: str | None = None) -> tuple[str, bytes]:
        """(content type, body) of the current metrics: OpenMetrics if ``accept`` asks for it."""
        ...

    async def render_metrics_off_loop(self, accept: str | None = None) -> tuple[str, bytes]:
        """The same, encoded off the event loop (what ``GET /metrics`` calls)."""
        ...

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """``GET /ready``: (ready, the JSON body)."""
        ...


#: ``POST /reload``: runs one reload that starts after the call and returns its errors
#: ([] = applied, None = not run: shutting down).
Reloader = Callable[[], Awaitable["list[str] | None"]]


#: ``POST /upgrade`` (``workers`` > 1): (True, the new supervisor's pid) once it serves, or (False, why not).
Upgrader = Callable[[], Awaitable["tuple[bool, str]"]]


class AdminState(Protocol):
    """What a connection reads per request (``control.admin.AdminServer``): a reload swaps both."""

    app: AdminApp
    token: bytes | None
    config: AdminConfig | None
    reloader: Reloader | None  # None: POST /reload is not offered (an embedding without a config file)
    reload_timeout_s: float  # how long POST /reload may wait for its reload


# -- answers -------------------------------------------------------------------------------------

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


@dataclass(frozen=True, slots=True)
class Later:
    """An answer that has to wait (``SessionsAcross``): ``run`` gives it."""

    run: Callable[[], Awaitable[Answer]]


#: What ``respond`` returns for ``POST /reload``, which ``answer_reload`` answers once the reload is done.
RELOAD: Answer = (0, [], b"")
#: What ``respond`` returns for ``GET``/``HEAD /metrics``: encoded off the loop, then answered.
METRICS: Answer = (0, [], b"")
UPGRADE: Answer = (0, [], b"")

#: Paths answered without the token unless ``admin.health_needs_token``.
HEALTH_PATHS = (["healthz"], ["ready"])


def respond(
    request: h11.Request, server: AdminState, site: AdminSite, peer: str, body: bytes = b""
) -> Answer | Later:
    """The response to one complete request (sans-I/O but for the App's own calls and the log)."""
    app, token = server.app, server.token
    method = request.method.decode("ascii", "replace")
    refusal = check_request(site, request.method, request.headers)
    segments = path_segments(request.target) if refusal is None else refusal
    if isinstance(segments, Refusal):
        _log_refusal(request, segments, peer)
        status, headers, body = text(segments.status, segments.reason)
        return status, [*headers, (b"Connection", b"close")] if segments.status == 421 else headers, body
    if segments in ([], ["favicon.ico"]) or (len(segments) == 2 and segments[0] == "static"):
        if method not in ("GET", "HEAD"):
            return _not_allowed("GET, HEAD")
        if segments == ["favicon.ico"]:
            return 204, [], b""  # browsers ask for it; a 404 would be an error in their console
        return _page_file("index.html" if not segments else segments[1], static=bool(segments))
    if token is not None and not (segments in HEALTH_PATHS and not (server.config and server.config.health_needs_token)):
        given = _bearer(request.headers)
        if given is None or not hmac.compare_digest(given, token):
            challenge = b'Bearer realm="wsproxy-admin"'
            if given is not None:
                challenge += b', error="invalid_token"'
            _log_refusal(request, Refusal(401, "invalid bearer token" if given else "no bearer token"), peer)
            status, headers, body = text(401, "a bearer token is required")
            return status, [*headers, (b"WWW-Authenticate", challenge)], body
    try:
        if segments in HEALTH_PATHS:
            if method not in ("GET", "HEAD"):
                return _not_allowed("GET, HEAD")
            if segments == ["healthz"]:
                return text(200, "ok")
            ready, document = app.readiness()
            return _json(200 if ready else 503, document)
        if segments == ["reload"]:
            if method != "POST":
                return _not_allowed("POST")
            if server.reloader is None:
                return text(404, "not found")
            return RELOAD
        if segments == ["upgrade"]:
            if method != "POST":
                return _not_allowed("POST")
            if getattr(server, "upgrader", None) is None:
                return text(404, "not found")
            return UPGRADE
        if segments in (["metrics"], ["status"]):
            if method not in ("GET", "HEAD"):
                return _not_allowed("GET, HEAD")
            if segments == ["metrics"]:
                return METRICS
            return _json(200, app.status())
        if segments == ["sessions"]:
            if method not in ("GET", "HEAD"):
                return _not_allowed("GET, HEAD")
            return _sessions(app, request.target)
        if len(segments) == 3 and segments[0] in ("sessions", "identities") and segments[2] == "close":
            if method != "POST":
                return _not_allowed("POST")
            order = parse_close_body(body)
            if isinstance(order, str):
                return _json(400, {"error": order})
            return _close(app, segments[0], segments[1], order, peer)
        if len(segments) == 5 and segments[0] == "pools" and segments[2] == "backends" and segments[4] in _ACTIONS:
            if method != "POST":
                return _not_allowed("POST")
            return _backend_action(app, segments[1], segments[3], segments[4], peer)
    except Exception:
        return internal_error(logged(method), logged(_path(request.target)))
    return text(404, "not found")


async def finish(later: Later, method: bytes, target: bytes) -> Answer:
    """The answer ``later`` gives, or a 500 if giving it raised."""
    try:
        return await later.run()
    except Exception:
        return internal_error(logged(method), logged(_path(target)))


def internal_error(method: str, path: str) -> Answer:
    """A 500 for a request whose handling raised: the traceback goes to the log, not to the client."""
    log_event(log, logging.ERROR, "error", exc_info=True, listener="admin", method=method, path=path)
    return text(500, "internal error")


async def answer_reload(server: AdminState, peer: str) -> Answer:
    """Run the reload ``POST /reload`` asked for and answer its outcome."""
    assert server.reloader is not None
    log_event(log, logging.INFO, "admin", action='reload', peer=peer)
    try:
        errors = await server.reloader()
    except Exception:
        return internal_error("POST", "/reload")
    if errors is None:
        return _json(503, {"applied": False, "errors": ["shutting down: no reload"]})
    if errors:
        return _json(409, {"applied": False, "errors": errors})
    return _json(200, {"applied": True, "generation": server.app.status()["generation"]})


async def answer_upgrade(server: AdminState, peer: str) -> Answer:
    """``POST /upgrade`` (a supervisor only): 200 ``{"upgraded": true, "pid"}`` once the new generation serves, else 409."""
    upgrader: Upgrader | None = getattr(server, "upgrader", None)
    assert upgrader is not None
    log_event(log, logging.INFO, "admin", action='upgrade', peer=peer)
    try:
        ok, detail = await upgrader()
    except Exception:
        return internal_error("POST", "/upgrade")
    if ok:
        return _json(200, {"upgraded": True, "pid": int(detail)})
    return _json(409, {"upgraded": False, "errors": [detail]})


def _log_refusal(request: h11.Request, refusal: Refusal, peer: str) -> None:
    """One line per refused request: WARNING for 401/403/421 (someone tried), INFO for a malformed path."""
    headers = dict(request.headers)  # the last of a repeated header is enough to say what was seen
    log_event(
        log,
        logging.INFO if refusal.status == 400 else logging.WARNING,
        "admin_refused",
        listener='admin',
        peer=peer,
        status=refusal.status,
        method=logged(request.method),
        path=logged(_path(request.target)),
        host=logged(headers.get(b"host", b"-")),
        origin=logged(headers.get(b"origin", b"-")),
        reason=refusal.reason,
    )


def _path(target: bytes) -> bytes:
    """The target without its query (only ``GET /sessions`` reads one, and a query is no business of the log)."""
    return target.split(b"?", 1)[0]


def _page_file(name: str, *, static: bool) -> Answer:
    """``index.html`` for ``GET /``, or a file of the page for ``GET /static/NAME``."""
    files = _page_files()
    if static and name == "index.html":
        name = ""  # the page itself is at "/" only
    found = files.get(name)
    if found is None:
        if not files:
            return text(404, f"the status page is not installed (no {PAGE_PACKAGE}/{PAGE_FOLDER} in the package)")
        return text(404, "not found")
    media_type, body = found
    return 200, [(b"Content-Type", media_type), *PAGE_HEADERS], body


@cache
def _page_files() -> Mapping[str, tuple[bytes, bytes]]:
    """Every file of the status page with a known suffix: name → (media type, content).

    Read once, on the first request for the page; the table is the whole
    allow-list, so no request target ever reaches the file system.
    """
    files: dict[str, tuple[bytes, bytes]] = {}
    try:
        folder = resources.files(PAGE_PACKAGE).joinpath(PAGE_FOLDER)
        entries = list(folder.iterdir()) if folder.is_dir() else []
        for entry in entries:
            suffix = os.path.splitext(entry.name)[1]
            if entry.is_file() and suffix in PAGE_MEDIA_TYPES and not entry.name.startswith("."):
                files[entry.name] = (PAGE_MEDIA_TYPES[suffix], entry.read_bytes())
    except OSError as exc:
        log_event(log, logging.ERROR, "error", listener="admin", reading=f"{PAGE_PACKAGE}/{PAGE_FOLDER}", error=str(exc))
    return files


def _sessions(app: AdminApp, target: bytes) -> Answer | Later:
    """``GET /sessions``: one page of the established sessions."""
    _, _, query_bytes = target.partition(b"?")
    try:
        query_text = query_bytes.decode("ascii")
    except UnicodeDecodeError:
        return _json(400, {"error": "the query string is not ASCII (percent-encode it)"})
    query = parse_query(query_text)
    if isinstance(query, str):
        return _json(400, {"error": query})
    control = app.session_control
    if not isinstance(control, SessionControl):  # the supervisor of workers > 1

        async def across() -> Answer:
            return _json(*await control.list_sessions(query))

        return Later(across)
    page, cursor = select(control.records(), query)
    return _json(200, {"sessions": [r.as_json() for r in page], "next": cursor})


def _close(app: AdminApp, kind: str, name: str, order: CloseOrder, peer: str) -> Answer | Later:
    """``POST /sessions/ID/close`` or ``POST /identities/IDENTITY/close``."""
    control = app.session_control
    if not isinstance(control, SessionControl):  # the supervisor of workers > 1
        return Later(lambda: _close_across(control, kind, name, order, peer))
    if kind == "sessions":
        closed = control.close_session(name, order, by=peer)
        if closed is None:
            log_event(
                log,
                logging.INFO,
                "admin",
                action='close_session',
                conn=logged(name),
                result='unknown',
                peer=peer,
            )
            return _json(404, {"error": "no such session", "id": name})
    else:
        closed = control.close_identity(name, order, by=peer)
        log_event(
            log,
            logging.INFO,
            "admin",
            action='close_identity',
            identity=logged(name),
            closed=closed,
            peer=peer,
        )
    return _json(200, {"closed": closed})


async def _close_across(control: SessionsAcross, kind: str, name: str, order: CloseOrder, peer: str) -> Answer:
    """``_close`` by a supervisor: the workers close, and each logs its closes; this logs the request's outcome."""
    if kind == "sessions":
        status, document = await control.close_session(name, order, by=peer)
        fields: dict[str, object] = {"action": "close_session", "conn": logged(name)}
    else:
        status, document = await control.close_identity(name, order, by=peer)
        fields = {"action": "close_identity", "identity": logged(name)}
    fields["result"] = {200: "closed", 404: "unknown"}.get(status, "unanswered")
    if "closed" in document:
        fields["closed"] = document["closed"]
    unanswered = document.get("unanswered")
    if isinstance(unanswered, list) and unanswered:
        fields["unanswered"] = ",".join(str(slot) for slot in unanswered)
    log_event(log, logging.INFO, "admin", **fields, peer=peer)
    return _json(status, document)


def _backend_action(app: AdminApp, pool: str, backend: str, action: str, peer: str) -> Answer:
    draining = _ACTIONS[action]
    changed = app.drain_backend(pool, backend) if draining else app.undrain_backend(pool, backend)
    result = "unknown" if changed is None else ("changed" if changed else "unchanged")
    log_event(
        log,
        logging.INFO,
        "admin",
        action=action,
        pool=logged(pool),
        backend=logged(backend),
        result=result,
        peer=peer,
    )
    if changed is None:
        return _json(404, {"error": "unknown pool or backend", "pool": pool, "backend": backend})
    return _json(200, {"pool": pool, "backend": backend, "draining": draining, "changed": changed})


def _bearer(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                return credentials.strip()
            return None
    return None


def text(status: int, message: str) -> Answer:
    return status, [(b"Content-Type", _TEXT)], message.encode() + b"\n"


def _json(status: int, document: object) -> Answer:
    return status, [(b"Content-Type", _JSON)], json.dumps(document, indent=2).encode() + b"\n"


def _not_allowed(allow: str) -> Answer:
    status, headers, body = text(405, "method not allowed")
    return status, [*headers, (b"Allow", allow.encode())], body
