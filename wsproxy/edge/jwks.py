"""Fetching the JWKS of ``routes[].auth.jwt.jwks_url``: a thin trio shell around httpx.

What it is: ``fetch_jwks`` (one HTTPS GET: TLS verified against ``jwks_ca``
or the system store, ``FETCH_TIMEOUT_S`` for all of it, at most
``MAX_JWKS_BYTES`` of body, a 200 and nothing else, no redirects, no proxy from
the environment) and ``JwksFetcher``, one per app, which keeps every
``JwksSource`` of the config in effect supplied:

- at start (``prepare``, before any listener opens): each URL is fetched once;
  a URL that cannot be fetched stops the start-up (``JwksStartupError``, one
  line and exit status 1) unless every route that names it also has static
  keys (``keys``, ``jwks_file``, ``secret_file``), which then serve alone;
- while running (``run``, in the control nursery): each URL again every
  ``jwks_refresh`` (after a failure, every ``jwks_min_refresh``);
- on demand (``before_verify``, called by the gate): a token whose ``kid`` the
  current keys lack makes one fetch, at most once per ``jwks_min_refresh`` per
  URL; requests that arrive meanwhile wait for the same fetch (bounded by
  ``FETCH_TIMEOUT_S``), then the token is judged with whatever keys there are.

A failed fetch keeps the last good key set, logs ``event=jwks_fetch_failed``
(WARNING) and is counted (``failures``, the ``wsproxy_jwks_fetch_failures_total``
series). The last good document of each URL outlives a reload: the sources of
a new config get it at once, without a fetch. A reload that adds a URL does
not wait for it: it is fetched on the next tick of ``run`` (within a second)
or by the first token that needs it; until then that route answers 503 if it
has no static keys.

What it is not: parsing and choosing keys (``proto.jwt.JwksSource``), or
verifying tokens (``proto.jwt.verify_jwt``).
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import trio

from ..config.schema import Config
from ..errors import WsproxyError
from ..log import log_event
from ..proto.auth import Credential
from ..proto.jwt import JwksSource

log = logging.getLogger("wsproxy.edge.jwks")

#: One fetch, connect and TLS included.
FETCH_TIMEOUT_S = 5.0
#: The largest JWKS accepted (real ones are a few KiB).
MAX_JWKS_BYTES = 1024 * 1024
USER_AGENT = "wsproxy-jwks"


class JwksFetchFailed(WsproxyError):
    """A JWKS could not be fetched or used; the message says what was seen."""


class JwksStartupError(WsproxyError):
    """At start, a ``jwks_url`` could not be fetched and a route has no other keys."""


def shown(url: str) -> str:
    """``url`` for logs: scheme, host and path (a query may hold an API key)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def client_ssl_context(ca: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def fetch_jwks(
    url: str, context: ssl.SSLContext, *, timeout_s: float = FETCH_TIMEOUT_S, max_bytes: int = MAX_JWKS_BYTES
) -> bytes:
    """GET ``url`` and return the body; raise ``JwksFetchFailed`` with the reason."""
    body = bytearray()
    with trio.move_on_after(timeout_s) as scope:
        try:
            async with httpx.AsyncClient(
                verify=context, timeout=timeout_s, follow_redirects=False, trust_env=False
            ) as client:
                headers = {"Accept": "application/jwk-set+json, application/json", "User-Agent": USER_AGENT}
                async with client.stream("GET", url, headers=headers) as response:
                    if response.status_code != 200:
                        raise JwksFetchFailed(f"status {response.status_code}")
                    declared = response.headers.get("content-length", "")
                    if declared.isdigit() and int(declared) > max_bytes:
                        raise JwksFetchFailed(f"Content-Length {declared} is over {max_bytes} bytes")
                    async for chunk in response.aiter_raw():
                        body += chunk
                        if len(body) > max_bytes:
                            raise JwksFetchFailed(f"more than {max_bytes} bytes")
        except httpx.HTTPError as exc:
            raise JwksFetchFailed(_describe(exc)) from None
    if scope.cancelled_caught:
        raise JwksFetchFailed(f"timed out after {timeout_s:g}s")
    return bytes(body)


def _describe(exc: httpx.HTTPError) -> str:
    cause: BaseException | None = exc
    while cause is not None:  # the TLS verifier's words, when that is what failed
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS verification failed: {cause.verify_message}"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass(slots=True)
class _Url:
    """What the fetcher knows of one URL, across reloads."""

    document: bytes | None = None  # the last good one
    fetched_at: float = -math.inf  # of the last good one
    attempted_at: float = -math.inf  # of the last attempt, good or not
    on_demand_at: float = -math.inf  # of the last fetch for an unknown kid (at most one per jwks_min_refresh)
    ok: bool = True  # the last attempt succeeded
    last_error: str = ""  # why the last attempt failed
    fetches: int = 0
    failures: int = 0
    inflight: trio.Event | None = None
    contexts: dict[str | None, ssl.SSLContext] = field(default_factory=dict)


class JwksFetcher:
    """Keeps the ``JwksSource`` objects of the config in effect supplied (module docstring)."""

    def __init__(self, current: Callable[[], Config], *, fetch: Callable[..., object] = fetch_jwks) -> None:
        self._current = current
        self._fetch = fetch
        self._urls: dict[str, _Url] = {}

    # -- what the metrics read -------------------------------------------------------

    @property
    def failures(self) -> dict[str, int]:
        """Failed fetches by URL (as logged), since start."""
        return {shown(url): state.failures for url, state in self._urls.items()}

    # -- the three occasions -------------------------------------------------------

    async def prepare(self) -> None:
        """Fetch every URL once before serving; ``JwksStartupError`` if a route would have no keys."""
        for url, sources in self._by_url().items():
            await self._refresh(url, sources, "start")
            for where, source in self._named_sources(url):
                if source.keys is None:
                    state = self._urls[url]
                    raise JwksStartupError(
                        f"{where}.auth.jwt.jwks_url: cannot fetch {shown(url)}: {state.last_error}; "
                        "with no keys, jwks_file or secret_file beside it the proxy cannot start"
                    )

    async def run(self) -> None:
        """Refresh each URL when due, until cancelled; one tick a second."""
        while True:
            now = trio.current_time()
            for url, sources in self._by_url().items():
                self._hand_out(url, sources)
                state = self._urls.get(url)
                if state is None:  # a reload added it: fetch now
                    due = -math.inf
                elif state.ok:
                    due = state.fetched_at + min(s.refresh_s for s in sources)
                else:  # the last attempt failed: again after jwks_min_refresh
                    due = state.attempted_at + min(s.min_refresh_s for s in sources)
                if now >= due and (state is None or state.inflight is None):
                    await self._refresh(url, sources, "refresh")
            await trio.sleep(1.0)

    async def before_verify(self, material: object, credential: Credential) -> None:
        """The gate's hook, before a JWT is verified: fetch again if the token names an unknown key."""
        if not isinstance(material, JwksSource):
            return
        if material.unknown_kid(credential.value) is None:
            return
        url = material.url
        sources = self._by_url().get(url, [material])
        self._hand_out(url, sources)  # another source may already have fetched it
        if material.unknown_kid(credential.value) is None:
            return
        state = self._urls.setdefault(url, _Url())
        if state.inflight is not None:  # someone is fetching: wait for that one
            with trio.move_on_after(FETCH_TIMEOUT_S):
                await state.inflight.wait()
            self._hand_out(url, sources)
            return
        now = trio.current_time()
        if now - state.on_demand_at < min(s.min_refresh_s for s in sources):
            return  # an unknown kid fetched recently: this one is judged with the keys there are
        state.on_demand_at = now
        await self._refresh(url, sources, "unknown_kid")

    # -- the work ------------------------------------------------------------------

    def _named_sources(self, url: str) -> Iterator[tuple[str, JwksSource]]:
        return ((where, source) for where, source in self._all_sources() if source.url == url)

    def _by_url(self) -> dict[str, list[JwksSource]]:
        grouped: dict[str, list[JwksSource]] = {}
        for _where, source in self._all_sources():
            grouped.setdefault(source.url, []).append(source)
        return grouped

    def _all_sources(self) -> Iterator[tuple[str, JwksSource]]:
        for i, route in enumerate(self._current().routes):
            auth = route.auth
            material = auth.jwt.key_material if auth is not None and auth.jwt is not None else None
            if isinstance(material, JwksSource):
                yield f"routes[{i}]", material

    def _hand_out(self, url: str, sources: list[JwksSource]) -> None:
        """Give sources that lack it the last good document (a reload's new sources: no fetch)."""
        state = self._urls.get(url)
        if state is None or state.document is None:
            return
        for source in sources:
            if source.installed_at is None or source.installed_at < state.fetched_at:
                try:
                    source.install(state.document, state.fetched_at)
                except ValueError:
                    pass  # unusable for this route's algorithms: logged when it was fetched

    async def _refresh(self, url: str, sources: list[JwksSource], why: str) -> None:
        state = self._urls.setdefault(url, _Url())
        if state.inflight is not None:
            await state.inflight.wait()
            return
        state.inflight = done = trio.Event()
        state.attempted_at = trio.current_time()
        state.fetches += 1
        try:
            ca = sources[0].ca
            context = state.contexts.get(ca)
            if context is None:
                context = state.contexts[ca] = client_ssl_context(ca)
            try:
                document = await self._fetch(url, context)  # type: ignore[misc]
                assert isinstance(document, bytes)
                problems = []
                counts = []
                for source in sources:  # check before anything changes: a bad set replaces nothing
                    try:
                        counts.append(JwksSource(url, source.algorithms, None, 1, 1).install(document, 0))
                    except ValueError as exc:
                        problems.append(str(exc))
                if problems:
                    raise JwksFetchFailed(f"unusable: {problems[0]}")
            except (JwksFetchFailed, OSError, ssl.SSLError) as exc:
                state.ok = False
                state.failures += 1
                state.last_error = str(exc)
                kept = max((len(s.keys.keys) for s in sources if s.keys is not None), default=0)
                log_event(
                    log,
                    logging.WARNING,
                    "jwks_fetch_failed",
                    url=shown(url),
                    why=why,
                    reason=str(exc),
                    kept_keys=kept,
                    failures=state.failures,
                )
                return
            state.ok = True
            state.document = document
            state.fetched_at = trio.current_time()
            state.last_error = ""
            self._hand_out(url, sources)
            log_event(
                log,
                logging.INFO,
                "jwks_fetched",
                url=shown(url),
                why=why,
                keys=max(counts, default=0),
                bytes=len(document),
            )
        finally:
            state.inflight = None
            done.set()


__all__ = ["FETCH_TIMEOUT_S", "JwksFetchFailed", "JwksFetcher", "JwksStartupError", "MAX_JWKS_BYTES", "fetch_jwks"]
