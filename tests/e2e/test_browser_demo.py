"""End to end: the browser demo of ``make demo``, driven by a real Chromium.

Each test runs the real ``python -m wsproxy.demo`` subprocess on free ports
(``--proxy-port``, ``--page-port``, ``--admin-port`` found by binding and
releasing, ``--backend-base-port 0``), so it never clashes with a demo that is
running by hand; its output (the demo's printout and the proxy's log) goes to
a file the tests read. The browser is Debian's ``/usr/bin/chromium`` under
Playwright's sync API, which runs in a worker thread (``trio.to_thread``): the
async API does not run under trio. Screenshots go to ``tests/artifacts/``.

What is covered: two browser contexts (two cookie jars) chat through the
proxy and see each other's messages; the sticky cookie keeps a reloaded tab
on its backend; draining tab A's backend through the admin API closes A with
1012, A waits 1-3 s, reconnects to another backend and keeps chatting with B,
showing each message of the room once; a page served from an origin that is
not on the allowlist cannot connect and the proxy logs a 403 for that Origin,
while the page from http://localhost:PORT (on the allowlist) can; the echo
route still works, and SIGINT stops the demo with exit status 0 and no
traceback. What is not here: the status page (the admin listener's own tests).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.kit.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS
from tests.kit.servers import closed_port, raw_request, status_of
from wsproxy.demo.chat import Site, serve_page

try:
    from playwright.sync_api import Browser, Locator, Page, expect, sync_playwright
except ImportError:  # the tests that need a browser skip
    sync_playwright = None  # type: ignore[assignment]

needs_playwright = pytest.mark.skipif(
    sync_playwright is None, reason="needs the playwright package (pip install playwright; the browser is /usr/bin/chromium)"
)
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
)

READY_S = 20.0  # the demo: listening, printout done, every chat backend healthy
STOP_S = 15.0  # the demo after SIGINT
UI_MS = 10_000  # one expectation on a page
BACKEND_RE = r"connected to chat-\d \(127\.0\.0\.1:\d+\)"


# -- the demo as a subprocess -----------------------------------------------------------------------


@dataclass
class Demo:
    proc: trio.Process
    log: Path
    proxy: int
    page: int
    admin: int

    def output(self) -> str:
        return self.log.read_text(errors="replace")


async def _admin_status(port: int) -> dict[str, Any] | None:
    try:
        response = await raw_request(
            port, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % port, read_timeout_s=2
        )
    except OSError:
        return None
    if not response or status_of(response) != 200:
        return None
    document = json.loads(response.partition(b"\r\n\r\n")[2])
    assert isinstance(document, dict)
    return document


@asynccontextmanager
async def running_demo(tmp_path: Path) -> AsyncIterator[Demo]:
    """The demo on free ports, ready (every chat backend up); SIGINT and a clean exit afterwards."""
    proxy, page, admin = closed_port(), closed_port(), closed_port()
    log = tmp_path / "demo.log"
    command = [
        sys.executable, "-m", "wsproxy.demo", "--proxy-port", str(proxy), "--page-port", str(page),
        "--admin-port", str(admin), "--backend-base-port", "0",
    ]
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process(command, stdout=out, stderr=subprocess.STDOUT)
        demo = Demo(proc, log, proxy, page, admin)
        try:
            with trio.fail_after(READY_S):
                while True:
                    assert proc.poll() is None, f"the demo exited early:\n{demo.output()}"
                    status = await _admin_status(admin) if "Stop: Ctrl-C" in demo.output() else None
                    if status is not None:
                        backends = status["pools"]["chat"]["backends"]  # type: ignore[index]
                        if all(b["health"] == "up" for b in backends):
                            break
                    await trio.sleep(0.1)
            yield demo
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                with trio.move_on_after(STOP_S):
                    await proc.wait()
                if proc.poll() is None:
                    proc.kill()
                    await proc.wait()


async def in_browser(scenario: Callable[[Browser], None]) -> None:
    """Run ``scenario`` with a fresh Chromium, in a worker thread (Playwright's sync API)."""

    def run() -> None:
        assert sync_playwright is not None
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                scenario(browser)
            finally:
                browser.close()

    await trio.to_thread.run_sync(run)


def open_tab(browser: Browser, url: str, nick: str) -> Page:
    """A page in its own browser context (its own cookie jar), with ``nick`` as the chat name."""
    context = browser.new_context(viewport={"width": 900, "height": 640})
    context.add_init_script(f"sessionStorage.setItem('wsproxy-demo-nick', {json.dumps(nick)})")
    page = context.new_page()
    page.goto(url)
    return page


def say(page: Page, text: str) -> None:
    expect(page.locator("#text")).to_be_enabled(timeout=UI_MS)
    page.fill("#text", text)
    page.click("#send")


def drain(admin_port: int, pool: str, address: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/pools/{pool}/backends/{quote(address, safe='')}/drain", data=b"", method="POST"
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        document = json.load(response)
    assert isinstance(document, dict)
    return document


def logged_at(line: Locator) -> float:
    """When the page wrote a log line, in seconds of the page's clock."""
    stamp = line.locator("time").get_attribute("datetime")
    assert stamp is not None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


# -- the tests ----------------------------------------------------------------------------------------


@needs_playwright
@needs_chromium
@pytest.mark.timeout(180)
async def test_two_tabs_chat_and_a_drain_moves_one(tmp_path: Path) -> None:
    async with running_demo(tmp_path) as demo:
        seen: dict[str, Any] = {}

        def scenario(browser: Browser) -> None:
            url = f"http://127.0.0.1:{demo.page}/"
            a = open_tab(browser, url, "alice")
            expect(a.locator("#backend")).to_have_text(re.compile(BACKEND_RE), timeout=UI_MS)
            b = open_tab(browser, url, "bob")  # after A's hello: least_conn puts B elsewhere
            expect(b.locator("#backend")).to_have_text(re.compile(BACKEND_RE), timeout=UI_MS)
            expect(a.locator("#state")).to_have_attribute("data-state", "open")
            backend_a = a.locator("#backend").get_attribute("data-backend")
            address_a = a.locator("#backend").get_attribute("data-address")
            backend_b = b.locator("#backend").get_attribute("data-backend")
            seen.update(backend_a=backend_a, address_a=address_a, backend_b=backend_b)
            cookies = {c["name"]: c["value"] for c in a.context.cookies()}
            assert "wsp_chat" in cookies, a.context.cookies()

            say(a, "hello from alice")
            expect(b.locator("#log")).to_contain_text("hello from alice", timeout=UI_MS)
            say(b, "hello from bob")
            expect(a.locator("#log")).to_contain_text("hello from bob", timeout=UI_MS)
            expect(b.locator("#members")).to_contain_text("alice", timeout=UI_MS)

            b.reload()  # the sticky cookie brings B back to its backend
            expect(b.locator("#backend")).to_have_text(re.compile(rf"connected to {backend_b} "), timeout=UI_MS)

            assert address_a is not None
            answer = drain(demo.admin, "chat", address_a)
            assert answer == {"pool": "chat", "backend": address_a, "draining": True, "changed": True}
            closed = a.locator("#log li.closed").last
            expect(closed).to_contain_text("closed: 1012 service restart", timeout=UI_MS)
            wait_s = float(re.search(r"reconnecting in ([\d.]+) s", closed.inner_text())[1])  # type: ignore[index]
            assert 1.0 <= wait_s <= 3.0, closed.inner_text()
            expect(a.locator("#backend")).to_have_text(
                re.compile(rf"^connected to (?!{backend_a} )chat-\d "), timeout=UI_MS
            )
            # Both instants come from the page's own clock (the log lines' <time datetime>):
            # the test's polling of the page adds nothing to either.
            hello = a.locator("#log li.hello").last
            seen["waited_s"] = logged_at(hello) - logged_at(closed)
            seen["wait_s"] = wait_s
            seen["backend_a2"] = a.locator("#backend").get_attribute("data-backend")
            assert {c["name"]: c["value"] for c in a.context.cookies()}["wsp_chat"] != cookies["wsp_chat"]

            say(a, f"alice is back, now on {seen['backend_a2']}")
            expect(b.locator("#log")).to_contain_text("alice is back", timeout=UI_MS)
            say(b, "welcome back alice")
            expect(a.locator("#log")).to_contain_text("welcome back alice", timeout=UI_MS)
            expect(b.locator("#members")).to_contain_text(f"alice {seen['backend_a2']}", timeout=UI_MS)
            # the new backend's hello replayed the room: every message is shown once
            log_a = a.locator("#log").inner_text()
            assert log_a.count("hello from alice") == 1 and log_a.count("hello from bob") == 1, log_a
            screenshot(a, "browser-demo-a-after-drain.png")
            screenshot(b, "browser-demo-b.png")

        await in_browser(scenario)
        output = demo.output()

    assert seen["backend_a"] != seen["backend_b"], seen
    # The page waited the delay it announced (shown rounded to 0.1 s) before the new hello.
    assert seen["waited_s"] >= seen["wait_s"] - 0.05, seen
    assert f"event=drain pool=chat backend={seen['address_a']} reason=admin" in output, output
    assert "client_code=1012" in output, output


@needs_playwright
@needs_chromium
@pytest.mark.timeout(180)
async def test_a_page_from_another_origin_is_refused(tmp_path: Path) -> None:
    async with running_demo(tmp_path) as demo, trio.open_nursery() as nursery:
        # The same page, served from a port that is not on the route's origins list.
        site = Site(proxy_port=demo.proxy, admin_port=demo.admin)
        other = await nursery.start(serve_page, site, "127.0.0.1", 0)

        def scenario(browser: Browser) -> None:
            page = open_tab(browser, f"http://127.0.0.1:{other}/", "mallory")
            expect(page.locator("#state")).to_have_attribute("data-state", "error", timeout=UI_MS)
            expect(page.locator("#state")).to_contain_text("cannot connect")
            expect(page.locator("#log")).to_contain_text("cannot connect", timeout=UI_MS)
            expect(page.locator("#log li.error")).to_contain_text("(attempt 2)", timeout=UI_MS)  # it retries...
            expect(page.locator("#log li")).to_have_count(1)  # ...on one line
            screenshot(page, "browser-demo-refused.png")
            # http://localhost:PAGE is on the list: that page connects
            ok = open_tab(browser, f"http://localhost:{demo.page}/", "lola")
            expect(ok.locator("#backend")).to_have_text(re.compile(BACKEND_RE), timeout=UI_MS)

        await in_browser(scenario)
        output = demo.output()
        nursery.cancel_scope.cancel()

    assert re.search(rf"status=403 reason=\"Origin not allowed: http://127\.0\.0\.1:{other}\"", output), output
    assert re.search(r"route=\*/chat pool=chat .*", output), output  # the localhost page got through


async def test_echo_route_and_a_clean_sigint(tmp_path: Path) -> None:
    async with running_demo(tmp_path) as demo:
        with trio.fail_after(10):
            async with open_websocket_url(f"ws://127.0.0.1:{demo.proxy}/") as ws:
                greeting = await ws.get_message()
                await ws.send_message("ping")
                assert await ws.get_message() == "ping"
            page = await raw_request(demo.page, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            config_js = await raw_request(demo.page, b"GET /config.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            missing = await raw_request(demo.page, b"GET /../pyproject.toml HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        demo.proc.send_signal(signal.SIGINT)
        with trio.fail_after(STOP_S):
            code = await demo.proc.wait()
        output = demo.output()

    assert re.match(r"echo-\d: connected", str(greeting)), greeting
    assert status_of(page) == 200 and b"<title>wsproxy demo chat</title>" in page
    assert f'"proxyPort": {demo.proxy}'.encode() in config_js
    assert status_of(missing) == 404
    assert code == 0, output
    assert "Traceback" not in output, output
    assert "event=stopped" in output, output
