"""End to end: the status page's sessions view, in a real browser (Debian's Chromium via Playwright).

A real ``App`` with a static-tokens route and an admin token (``tests.e2e.
test_sessions.start_stack``), real trio-websocket clients holding sessions
as alice, bob and nobody, and the page driven as ``tests.e2e.test_status_page``
drives it (Playwright's sync API in a worker thread). Covered: the admin token
entered once serves the sessions view too (no extra 401 in the console), every
session listed with its identity, client, route and backend, the search by
identity, client address and route, Close pressed from the keyboard (the
client gets 1008 at once, the row goes, the event is announced, the other
sessions stay), no horizontal scroll at 375 px, and no console errors.
"""

from __future__ import annotations

from functools import partial

import pytest
import trio

from tests.e2e.test_sessions import ADMIN_TOKEN, Client, Stack, open_client, start_stack
from tests.e2e.test_status_page import (
    ARTIFACTS,
    UNAUTHORIZED_LOG,
    Browser,
    call,
    expect,
    needs_browser,
    no_horizontal_scroll,
    with_browser,
)


async def test_the_sessions_view_files_are_served(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        stack = await start_stack(nursery, admin_token=None)
        page = await call(stack.admin, "GET", "/")
        html = page.body.decode()
        assert '<script src="/static/sessions.js" defer>' in html
        assert '<link rel="stylesheet" href="/static/sessions.css">' in html
        for name, media_type in (("sessions.js", "text/javascript"), ("sessions.css", "text/css")):
            reply = await call(stack.admin, "GET", f"/static/{name}")
            assert (reply.status, reply.headers["content-type"]) == (200, f"{media_type}; charset=utf-8"), name


@needs_browser
@pytest.mark.timeout(120)
async def test_sessions_view_searches_and_closes_from_the_keyboard(nursery: trio.Nursery) -> None:
    stack: Stack = await start_stack(nursery)
    with trio.fail_after(10):
        clients: dict[str, Client] = {
            "alice-1": await open_client(stack, nursery, "alice"),
            "alice-2": await open_client(stack, nursery, "alice"),
            "bob": await open_client(stack, nursery, "bob"),
            "nobody": await open_client(stack, nursery, None, path="/open"),
        }
    ids = [s.conn_id for s in stack.app.sessions.values()]
    bob_id = next(s.conn_id for s in stack.app.sessions.values() if s.identity == "bob")

    def steps(browser: Browser) -> None:
        page = browser.page
        expect(page.locator("#token-input")).to_be_focused()
        page.keyboard.type(ADMIN_TOKEN.decode())
        page.keyboard.press("Enter")
        expect(page.locator("#token-form")).to_be_hidden()

        rows = page.locator("#sessions tr")
        expect(rows).to_have_count(4, timeout=4000)
        expect(page.locator("#sessions-count")).to_have_text("4 sessions.")
        assert rows.evaluate_all("rs => rs.map(r => r.dataset.session)") == ids  # oldest first
        bob_row = page.locator(f'#sessions tr[data-session="{bob_id}"]')
        expect(bob_row.locator("td.identity")).to_have_text("bob")
        expect(bob_row.locator("td.route")).to_have_text("*/chat")
        expect(bob_row.locator("td.backend")).to_have_text(f"main 127.0.0.1:{stack.backend.port}")
        expect(bob_row.locator("td.peer")).to_contain_text("127.0.0.1:")
        expect(page.locator(f'#sessions tr[data-session="{ids[3]}"] td.identity')).to_have_text("–")

        search = page.locator("#sessions-search")
        for text, visible in (("ALICE", 2), ("*/chat", 3), ("127.0.0.1", 4), ("nobody-here", 0)):
            search.fill(text)
            expect(page.locator("#sessions tr:visible")).to_have_count(visible)
            expect(page.locator("#sessions-count")).to_have_text(f"{visible} of 4 sessions match.")
        peer = bob_row.locator("td.peer").inner_text()
        search.fill(peer)  # a client's address and port finds that one session
        expect(page.locator("#sessions tr:visible")).to_have_count(1)

        search.fill("bob")
        close = bob_row.locator("button.close-session")
        expect(close).to_have_attribute("aria-label", f"Close session {bob_id} (identity bob, client {peer})")
        page.keyboard.press("Tab")  # from the search box to the one visible Close button
        assert page.evaluate("document.activeElement.className") == "close-session"
        page.keyboard.press("Enter")
        trio.from_thread.run(_wait_closed, clients["bob"])
        assert clients["bob"].code == 1008
        expect(bob_row).to_have_count(0, timeout=4000)
        expect(page.locator("#events")).to_contain_text(f"Session {bob_id} (bob, {peer}) closed.")
        expect(page.locator("#announcer")).to_contain_text("closed")
        expect(page.locator("#sessions-count")).to_have_text("0 of 3 sessions match.")
        expect(search).to_be_focused()  # the focus did not fall off the page with the row

        search.fill("")
        expect(page.locator("#sessions tr:visible")).to_have_count(3)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.screenshot("status-page-sessions.png")
        page.set_viewport_size({"width": 375, "height": 667})
        page.wait_for_timeout(500)
        no_horizontal_scroll(page)
        browser.screenshot("status-page-sessions-phone.png")

    errors = await trio.to_thread.run_sync(partial(with_browser, stack.url, steps, viewport={"width": 1280, "height": 900}))
    assert [e for e in errors if not e.startswith(UNAUTHORIZED_LOG)] == [], errors
    assert len(errors) == 1, errors  # the first /status only: the sessions view waits for the token
    for name in ("alice-1", "alice-2", "nobody"):
        assert not clients[name].closed.is_set(), name


async def _wait_closed(client: Client) -> None:
    with trio.fail_after(5):
        await client.closed.wait()
