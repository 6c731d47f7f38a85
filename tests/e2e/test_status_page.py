"""End to end: the status page of the admin listener, in a real browser.

Each test runs a real ``wsproxy.app.App`` (``start_proxy``) over two real
trio-websocket echo backends, and ``serve_admin`` for it, in the test's
nursery. The browser is Debian's ``/usr/bin/chromium`` driven by Playwright's
sync API in a worker thread (``tests.kit.browser``) (``trio.to_thread.run_sync``); whatever the browser
step needs done on the trio side (open a WebSocket session, read
``App.status``, stop the admin listener) it asks for with ``trio.from_thread``.

What is covered: the page and its files (media types, CSP, no token needed,
nothing else served); in the browser, both backends shown "up" (and no
Workers table: one process; ``tests/supervisor/test_through_supervisor.py``
shows it with ``workers: 2``), an open
session counted on its backend within 2 s, Drain pressed from the keyboard
(the state shows draining, the session gets 1012, new sessions go to the other
backend, focus stays on the button, the change is announced), Undrain reached
with Tab, the admin token asked for (a wrong one refused, the right one kept
in memory only and used for the drain), no horizontal scroll at 375 px, the
"disconnected" banner, and no console errors or page errors; and that a page on
another loopback origin cannot drain through ``fetch(..., {method: "POST",
mode: "no-cors"})``, nor read ``/status`` through a rebinding name (421). Screenshots go
to ``tests/artifacts/`` (desktop and phone), for a human to look at.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.kit.admin import AdminClient, call
from tests.kit.browser import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    UNAUTHORIZED_LOG,
    Browser,
    expect,
    needs_browser,
    no_horizontal_scroll,
    sync_playwright,
    with_browser,
)
from tests.kit.servers import make_config, start_proxy, start_ws_backend
from wsproxy.app import App
from wsproxy.config.schema import Address, AdminConfig, DrainConfig, HealthConfig, PoolName
from wsproxy.control.admin import serve_admin

TOKEN = "s3cret-admin-token"


# -- the stack -----------------------------------------------------------------------------------


@dataclass
class Stack:
    app: App
    proxy_port: int
    backends: list[str]  # "127.0.0.1:PORT", as /status names them
    admin: str  # "127.0.0.1:PORT"
    admin_scope: trio.CancelScope

    @property
    def url(self) -> str:
        return f"http://{self.admin}/"


async def start_stack(nursery: trio.Nursery, *, token: str | None = None, names: tuple[str, ...] = ()) -> Stack:
    ports = [await start_ws_backend(nursery) for _ in range(2)]
    config = make_config(ports)
    backends = config.pools[PoolName("main")].backends
    if names:
        backends = tuple(dataclasses.replace(b, name=n) for b, n in zip(backends, names, strict=True))
    pool = dataclasses.replace(
        config.pools[PoolName("main")],
        backends=backends,
        drain=DrainConfig(timeout_s=0.0, spread_s=0.0),  # a drain closes the sessions at once
        health=HealthConfig(type="tcp", interval_s=0.5, timeout_s=1.0, rise=1),  # a check result and RTT to show
    )
    config = dataclasses.replace(config, pools={PoolName("main"): pool})
    app, proxy_port = await start_proxy(nursery, config)
    admin_config = AdminConfig(
        bind=Address("127.0.0.1", 0),
        token_file="/run/admin.token" if token else None,
        token=token.encode() if token else None,
    )
    scope = trio.CancelScope()

    async def run_admin(*, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve_admin(app, admin_config, task_status=task_status)

    address = await nursery.start(run_admin)
    return Stack(app, proxy_port, [f"127.0.0.1:{p}" for p in ports], address, scope)


@dataclass
class Held:
    """A WebSocket session kept open through the proxy until the proxy closes it."""

    backend: str  # where the proxy sent it
    closed: trio.Event = field(default_factory=trio.Event)
    close_code: int | None = None


async def hold_session(stack: Stack, nursery: trio.Nursery) -> Held:
    """Open a session, say hello, find its backend in ``App.status``; keep it open in ``nursery``."""
    before = _active(stack.app)

    async def run(*, task_status: trio.TaskStatus[Held] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_websocket_url(f"ws://127.0.0.1:{stack.proxy_port}/chat") as ws:
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            grown = [b for b, n in _active(stack.app).items() if n == before.get(b, 0) + 1]
            assert len(grown) == 1, (before, _active(stack.app))
            held = Held(grown[0])
            task_status.started(held)
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                held.close_code = exc.reason.code if exc.reason else None
            held.closed.set()

    result: Held = await nursery.start(run)
    return result


def _active(app: App) -> dict[str, int]:
    pools: Any = app.status()["pools"]
    return {b["address"]: b["active"] for b in pools["main"]["backends"]}


# -- without a browser: what the listener serves ---------------------------------------------------


async def test_the_page_and_its_files_are_served_with_their_media_types_and_a_csp(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery, token=TOKEN)  # the page needs no token: it holds no data
        page = await call(stack.admin, "GET", "/")
        assert page.status == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert page.headers["x-content-type-options"] == "nosniff"
        html = page.body.decode()
        assert '<script src="/static/status.js"' in html and '<link rel="stylesheet" href="/static/status.css">' in html
        assert not re.search(r"<script(?![^>]*\bsrc=)", html), "an inline script would be refused by the CSP"
        assert " style=" not in html and "<style" not in html, "inline style would be refused by the CSP"
        assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
        for name, media_type in (("status.css", "text/css"), ("status.js", "text/javascript")):
            reply = await call(stack.admin, "GET", f"/static/{name}")
            assert reply.status == 200, name
            assert reply.headers["content-type"] == f"{media_type}; charset=utf-8"
            assert reply.body
            head = await call(stack.admin, "HEAD", f"/static/{name}")
            assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) == len(reply.body)
        for target in ("/static/index.html", "/static/nope.js", "/static/..%2Fadmin.py", "/static/", "/index.html",
                       "/static/status.js/x", "/static/__init__.py"):  # fmt: skip
            reply = await call(stack.admin, "GET", target, token=TOKEN.encode())
            assert reply.status == 404, target
        reply = await call(stack.admin, "POST", "/")
        assert (reply.status, reply.headers["allow"]) == (405, "GET, HEAD")
        assert (await call(stack.admin, "GET", "/status")).status == 401  # the data still needs the token


async def test_the_page_is_served_on_a_kept_alive_connection(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery)
        client = await AdminClient.connect(stack.admin)
        try:
            for target in ("/", "/static/status.css", "/static/status.js", "/status", "/"):
                assert (await client.request("GET", target)).status == 200, target
        finally:
            await client.aclose()


# -- in the browser --------------------------------------------------------------------------------


@needs_browser
@pytest.mark.timeout(120)
async def test_status_page_is_live_and_drains_from_the_keyboard(nursery: trio.Nursery) -> None:
    stack = await start_stack(nursery)
    a, b = stack.backends
    held: list[Held] = []

    def open_session() -> Held:
        session: Held = trio.from_thread.run(hold_session, stack, nursery)
        held.append(session)
        return session

    def steps(browser: Browser) -> None:
        page = browser.page
        expect(page.locator("#conn")).to_have_attribute("data-conn", "up")
        for backend in (a, b):
            expect(browser.state(backend)).to_have_text("up")
            expect(browser.row(backend).locator("td.check")).to_have_text("ok")
            expect(browser.row(backend).locator("td.rtt")).to_have_text(re.compile(r"^\d+(\.\d+)? ms$"))
        expect(page.locator("#generation")).to_have_text("1")
        expect(page.locator("#workers-section")).to_be_hidden()  # one process: no Workers table
        expect(page.locator("#totals-title")).to_have_text("Process")
        expect(page.locator("#listeners")).to_contain_text("test")
        expect(page.locator("#routes")).to_contain_text("main")

        # An open session is counted on its backend within 2 s.
        first = open_session()
        other = b if first.backend == a else a
        expect(browser.row(first.backend).locator("td.active")).to_have_text("1", timeout=2000)
        expect(browser.row(other).locator("td.active")).to_have_text("0")
        expect(page.locator("#t-sessions")).to_have_text("1", timeout=2000)
        page.wait_for_timeout(2500)  # a few points on the sparklines

        # Drain from the keyboard: focus the button, press Enter.
        drain = browser.row(first.backend).locator("button.drain")
        drain.focus()
        page.keyboard.press("Enter")
        expect(browser.state(first.backend)).to_have_text("draining")
        expect(browser.row(first.backend)).to_have_attribute("data-state", "draining")
        trio.from_thread.run(_wait_closed, first)
        assert first.close_code == 1012  # RFC 6455 §7.4.1: service restart, try again
        expect(browser.row(first.backend).locator("td.active")).to_have_text("0", timeout=2000)
        expect(page.locator("#announcer")).to_contain_text("draining")
        expect(page.locator("#events")).to_contain_text(f"{first.backend}: up → draining")
        # Only what changes something is enabled; the keyboard user lands on it.
        expect(drain).to_be_disabled()
        undrain = browser.row(first.backend).locator("button.undrain")
        expect(undrain).to_be_enabled()
        expect(browser.row(other).locator("button.drain")).to_be_enabled()
        expect(browser.row(other).locator("button.undrain")).to_be_disabled()
        expect(undrain).to_be_focused()

        # New sessions go to the other backend.
        second = open_session()
        assert second.backend == other
        expect(browser.row(other).locator("td.active")).to_have_text("1", timeout=2000)
        page.wait_for_timeout(1500)
        browser.screenshot("status-page-desktop.png")

        # Undrain has the focus: Enter puts the backend back, and the focus goes back to Drain.
        focused = page.evaluate("document.activeElement.getAttribute('aria-label')")
        assert focused == f"Undrain {first.backend} in pool main"
        page.keyboard.press("Enter")
        expect(browser.state(first.backend)).to_have_text("up")
        expect(page.locator("#events")).to_contain_text(f"{first.backend}: draining → up")
        expect(undrain).to_be_disabled()
        expect(drain).to_be_enabled()
        expect(drain).to_be_focused()

        # A phone: 375 px wide, nothing to scroll sideways.
        page.set_viewport_size({"width": 375, "height": 667})
        page.wait_for_timeout(1200)
        expect(browser.state(a)).to_be_visible()
        no_horizontal_scroll(page)
        browser.screenshot("status-page-phone.png")
        assert browser.errors == [], browser.errors

        # The admin API goes away: the banner says so, and the page keeps trying.
        trio.from_thread.run_sync(stack.admin_scope.cancel)
        expect(page.locator("#banner")).to_be_visible(timeout=4000)
        expect(page.locator("#banner")).to_contain_text("Disconnected")
        expect(page.locator("#conn")).to_have_attribute("data-conn", "down")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "status-page-disconnected.png"))

    errors = await trio.to_thread.run_sync(partial(with_browser, stack.url, steps, viewport={"width": 1280, "height": 800}))
    # Once the listener is gone, Chromium logs each refused fetch; nothing else may appear.
    assert all("ERR_CONNECTION_REFUSED" in e for e in errors), errors


@needs_browser
@pytest.mark.timeout(120)
async def test_names_addresses_and_a_pool_without_any_available_backend(nursery: trio.Nursery) -> None:
    stack = await start_stack(nursery, names=("chat-1", "chat-2"))
    a, b = stack.backends
    pools: Any = stack.app.status()["pools"]
    assert [x["name"] for x in pools["main"]["backends"]] == ["chat-1", "chat-2"] and pools["main"]["available"] == 2

    def drain(backend: str, action: str = "drain") -> None:
        reply = trio.from_thread.run(partial(call, stack.admin, "POST", f"/pools/main/backends/{backend}/{action}"))
        assert reply.status == 200

    def steps(browser: Browser) -> None:
        page = browser.page
        warning = page.locator('section[data-pool="main"] .pool-warning')
        expect(browser.state(a)).to_have_text("up")
        expect(browser.row(a).locator(".backend-name")).to_have_text("chat-1")
        expect(browser.row(b).locator(".backend-name")).to_have_text("chat-2")
        assert browser.row(a).locator("button.drain").get_attribute("aria-label") == f"Drain chat-1 ({a}) in pool main"
        expect(warning).to_be_hidden()

        # 1200 px: an address is one piece, never broken at its colon or inside its port.
        page.set_viewport_size({"width": 1200, "height": 800})
        page.wait_for_timeout(300)
        for address in page.locator("code.address").all():
            assert address.evaluate("e => getComputedStyle(e).whiteSpace") == "nowrap"
            assert address.evaluate("e => e.getClientRects().length") == 1, address.text_content()
        no_horizontal_scroll(page)

        # Every backend draining: the pool's clients get 503, and the page says so.
        drain(a)
        drain(b)
        expect(warning).to_be_visible(timeout=3000)
        expect(warning).to_contain_text("No backend of pool main is available")
        expect(page.locator("#events")).to_contain_text("Pool main: no backend available")
        browser.screenshot("status-page-no-backend.png")
        drain(b, "undrain")
        expect(warning).to_be_hidden(timeout=3000)
        assert browser.errors == [], browser.errors

    errors = await trio.to_thread.run_sync(partial(with_browser, stack.url, steps, viewport={"width": 1280, "height": 800}))
    assert errors == [], errors


@needs_browser
@pytest.mark.timeout(120)
async def test_status_page_asks_for_the_token_and_keeps_it_in_memory(nursery: trio.Nursery) -> None:
    stack = await start_stack(nursery, token=TOKEN)
    a, _ = stack.backends

    def steps(browser: Browser) -> None:
        page = browser.page
        form = page.locator("#token-form")
        expect(form).to_be_visible()
        expect(page.locator("#token-input")).to_be_focused()
        expect(page.locator("#conn")).to_have_attribute("data-conn", "auth")

        page.keyboard.type("not-the-token")
        page.keyboard.press("Enter")
        expect(page.locator("#token-error")).to_be_visible()
        expect(page.locator("#token-error")).to_contain_text("refused")
        expect(page.locator("#token-input")).to_be_focused()
        expect(page.locator("#token-input")).to_have_value("")

        page.keyboard.type(TOKEN)
        page.keyboard.press("Enter")
        expect(form).to_be_hidden()
        expect(browser.state(a)).to_have_text("up")
        expect(page.locator("#conn")).to_have_attribute("data-conn", "up")

        browser.row(a).locator("button.drain").focus()
        page.keyboard.press("Enter")
        expect(browser.state(a)).to_have_text("draining")  # the POST carried the token
        stored = page.evaluate(
            "[localStorage.length, sessionStorage.length, document.cookie, document.body.innerHTML.includes(%r)]" % TOKEN
        )
        assert stored == [0, 0, "", False]
        page.wait_for_timeout(1500)
        browser.screenshot("status-page-dark.png")
        page.set_viewport_size({"width": 375, "height": 667})
        no_horizontal_scroll(page)

    errors = await trio.to_thread.run_sync(partial(with_browser, stack.url, steps, color_scheme="dark"))
    assert [e for e in errors if not e.startswith(UNAUTHORIZED_LOG)] == [], errors
    assert len(errors) == 2, errors  # the first /status, and the one with the wrong token: polling waits for the form


async def _wait_closed(held: Held) -> None:
    with trio.fail_after(5):
        await held.closed.wait()


# -- another origin cannot drive the admin API (issue 15, item 1) -----------------------------------

EVIL_PAGE = """<!doctype html><title>evil</title><script>
window.attack = (async () => {
  const out = [];
  for (const mode of ["no-cors", "cors"]) {
    try {
      const r = await fetch("http://%(admin)s/pools/main/backends/%(backend)s/drain", {method: "POST", mode});
      out.push(mode + ":" + r.type);
    } catch (e) { out.push(mode + ":error"); }
  }
  return out;
})();
</script>"""


async def serve_evil_page(nursery: trio.Nursery, html: str) -> int:
    """A page on another loopback origin (its own port), served by hand: the attacker's site."""
    body = html.encode()
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data and (chunk := await stream.receive_some(4096)):
                data += chunk
            await stream.send_all(answer if data.startswith(b"GET / ") else b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


@needs_browser
@pytest.mark.timeout(120)
async def test_a_page_from_another_origin_cannot_drain_or_read_through_a_rebinding_name(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy.control.admin")
    stack = await start_stack(nursery)
    a, _ = stack.backends
    evil_port = await serve_evil_page(nursery, EVIL_PAGE % {"admin": stack.admin, "backend": a.replace(":", "%3A")})
    admin_port = stack.admin.rsplit(":", 1)[1]

    def browse() -> tuple[list[str], int, str]:
        assert sync_playwright is not None
        with sync_playwright() as playwright:
            # rebind.test resolves to 127.0.0.1, as an attacker's name does once rebound
            args = [*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebind.test 127.0.0.1"]
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
            try:
                page = browser.new_page()
                page.set_default_timeout(5000)
                response = page.goto(f"http://127.0.0.1:{evil_port}/")
                assert response is not None and response.status == 200
                outcome: list[str] = page.evaluate("window.attack")
                rebound = page.goto(f"http://rebind.test:{admin_port}/status")
                assert rebound is not None
                return outcome, rebound.status, page.content()
            finally:
                browser.close()

    outcome, rebound_status, rebound_body = await trio.to_thread.run_sync(browse)
    assert outcome == ["no-cors:opaque", "cors:error"], outcome  # both sent, neither readable, and:
    pools: Any = stack.app.status()["pools"]
    assert [b["draining"] for b in pools["main"]["backends"]] == [False, False]
    refused = [r.getMessage() for r in caplog.records if "event=admin_refused" in r.getMessage()]
    forbidden = [m for m in refused if "status=403" in m]
    assert len(forbidden) == 2, refused  # both POSTs (a "simple" request needs no preflight)
    assert all(f"method=POST path=/pools/main/backends/" in m and f"origin=http://127.0.0.1:{evil_port} " in m for m in forbidden)
    misdirected = [m for m in refused if "status=421" in m]  # Chromium retries a 421 once on a new connection
    assert f"status=421 method=GET path=/status host=rebind.test:{admin_port}" in misdirected[0], refused
    assert len(forbidden) + len(misdirected) == len(refused), refused
    assert rebound_status == 421 and '"pools"' not in rebound_body
    assert not [r for r in caplog.records if "event=admin action=" in r.getMessage()]
