"""End to end: the sessions API and per-identity caps, with real clients, tokens and backends.

A real ``App`` (``start_proxy``) in front of a trio-websocket backend that
echoes and records the close code it gets, and ``serve_admin`` for it
(``tests.kit.sessions.start_stack``). Clients
are trio-websocket connections that send real bearer tokens (static tokens
auth) or none. What is covered: ``GET /sessions`` (every field, each filter,
stable paging with the opaque cursor, 400s, the token), ``POST
/sessions/ID/close`` and ``POST /identities/IDENTITY/close`` (the client gets
the operator's code and reason at a frame boundary, the backend 1001, the log
line, ``outcome="admin"``, 404, every 400), and ``limits.max_sessions_per_identity``
with ``refuse`` (429 + Retry-After, ``reason="identity_limit"``) and
``close_oldest`` (1008 to the oldest, the new one relays), by token identity
and by sticky ``ip`` key. The paging and body rules are tested purely in
``tests/control/test_sessions.py``, the count table in
``tests/proto/test_identity_caps.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.kit.admin import AdminClient, Reply, call, parse_metrics, total
from tests.kit.sessions import ADMIN_TOKEN, USERS, Stack, open_client, start_stack
from wsproxy.config.schema import LimitsConfig


async def get(stack: Stack, target: str, token: bytes | None = ADMIN_TOKEN) -> Reply:
    return await call(stack.admin, "GET", target, token=token)


async def post(stack: Stack, target: str, body: object = None, raw: bytes | None = None) -> Reply:
    client = await AdminClient.connect(stack.admin)
    try:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        headers = [("Authorization", f"Bearer {ADMIN_TOKEN.decode()}"), ("Content-Type", "application/json")]
        return await client.request("POST", target, headers=headers, body=data)
    finally:
        await client.aclose()


def sessions_of(reply: Reply) -> list[dict[str, Any]]:
    assert reply.status == 200, reply.body
    document = reply.json()
    sessions = document["sessions"]
    assert isinstance(sessions, list)
    return sessions


def log_lines(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [m for m in (r.getMessage() for r in caplog.records) if f"event={event} " in m]


# -- GET /sessions -------------------------------------------------------------------------------


async def test_sessions_lists_every_field_and_filters(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        stack = await start_stack(nursery)
        alice = await open_client(stack, nursery, "alice")
        assert await alice.echo("x" * 100) == "x" * 100
        await open_client(stack, nursery, "bob")
        await open_client(stack, nursery, None, path="/open")
        assert (await get(stack, "/sessions", token=None)).status == 401  # the admin token, as everywhere
        everything = sessions_of(await get(stack, "/sessions"))
        assert len(everything) == 3
        first = everything[0]
        assert set(first) == {
            "id", "peer", "identity", "route", "pool", "backend", "age_s",
            "up_bytes", "down_bytes", "up_msgs", "down_msgs",
        }  # fmt: skip
        assert first["identity"] == "alice" and first["route"] == "*/chat" and first["pool"] == "main"
        assert first["backend"] == f"127.0.0.1:{stack.backend.port}"
        assert first["peer"].startswith("127.0.0.1:") and first["age_s"] >= 0
        assert (first["up_msgs"], first["down_msgs"]) == (2, 2)
        assert first["up_bytes"] > 100 and first["down_bytes"] > 100
        assert [s["identity"] for s in everything] == ["alice", "bob", None]
        assert [s["id"] for s in sessions_of(await get(stack, "/sessions?identity=bob"))] == [everything[1]["id"]]
        assert len(sessions_of(await get(stack, "/sessions?route=*/chat"))) == 2
        assert len(sessions_of(await get(stack, "/sessions?route=%2A%2F"))) == 1
        assert len(sessions_of(await get(stack, "/sessions?pool=main&backend=" + first["backend"]))) == 3
        assert sessions_of(await get(stack, "/sessions?pool=other")) == []
        assert len(sessions_of(await get(stack, "/sessions?peer=127.0.0.1"))) == 3  # the address alone
        assert len(sessions_of(await get(stack, f"/sessions?peer={first['peer']}"))) == 1
        head = await call(stack.admin, "HEAD", "/sessions", token=ADMIN_TOKEN)
        assert head.status == 200 and head.body == b""
        assert (await post(stack, "/sessions")).status == 405


async def test_sessions_pages_are_stable_while_sessions_end(nursery: trio.Nursery) -> None:
    with trio.fail_after(20):
        stack = await start_stack(nursery, auth=False)
        clients = [await open_client(stack, nursery) for _ in range(5)]
        ids = [s["id"] for s in sessions_of(await get(stack, "/sessions"))]
        assert len(ids) == 5
        reply = (await get(stack, "/sessions?limit=2")).json()
        assert [s["id"] for s in reply["sessions"]] == ids[:2]  # type: ignore[union-attr]
        cursor = reply["next"]
        assert isinstance(cursor, str)
        await clients[2].ws.aclose()  # the next page's first session ends meanwhile: nothing shifts
        with trio.fail_after(5):
            while ids[2] in (s["id"] for s in sessions_of(await get(stack, "/sessions"))):
                await trio.sleep(0.02)
        late = await open_client(stack, nursery)  # and a new one comes at the end
        reply = (await get(stack, f"/sessions?limit=2&cursor={cursor}")).json()
        assert [s["id"] for s in reply["sessions"]] == ids[3:5]  # type: ignore[union-attr]
        reply = (await get(stack, f"/sessions?limit=2&cursor={reply['next']}")).json()
        assert len(reply["sessions"]) == 1 and reply["next"] is None  # type: ignore[arg-type]
        assert late.closed.is_set() is False
        for target, error in (
            ("/sessions?limit=0", "limit"),
            ("/sessions?limit=1001", "limit"),
            ("/sessions?limit=ten", "limit"),
            ("/sessions?cursor=garbage", "cursor"),
            ("/sessions?user=alice", "unknown query parameter"),
            ("/sessions?pool=a&pool=b", "twice"),
        ):
            bad = await get(stack, target)
            assert bad.status == 400, target
            assert error in str(bad.json()["error"]), (target, bad.body)
        assert len(sessions_of(await get(stack, "/sessions?limit=1000"))) == 5


# -- closing ------------------------------------------------------------------------------------------


async def test_close_one_session_gives_the_client_1008_and_the_backend_1001(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    with trio.fail_after(15):
        stack = await start_stack(nursery)
        alice = await open_client(stack, nursery, "alice")
        bob = await open_client(stack, nursery, "bob")
        conn = sessions_of(await get(stack, "/sessions?identity=alice"))[0]["id"]
        reply = await post(stack, f"/sessions/{conn}/close")
        assert (reply.status, reply.json()) == (200, {"closed": 1})
        await alice.closed.wait()
        assert (alice.code, alice.reason) == (1008, "closed by the operator")
        with trio.fail_after(5):
            while not stack.backend.close_codes:
                await trio.sleep(0.01)
        assert stack.backend.close_codes == [1001]
        assert not bob.closed.is_set()
        assert await bob.echo("still here") == "still here"
        [line] = log_lines(caplog, "session_closed_by_admin")
        assert f"conn={conn} " in line and "identity=alice " in line and "code=1008 " in line
        assert 'reason="closed by the operator"' in line and USERS["alice"] not in line
        closes = [m for m in log_lines(caplog, "close") if f"conn={conn} " in m]
        assert len(closes) == 1 and "by=proxy" in closes[0]
        series = parse_metrics(await get(stack, "/metrics"))
        assert total(series, "wsproxy_sessions_closed_total", outcome="admin") == 1
        assert total(series, "wsproxy_close_codes_total", sent_by="proxy", to="client", code="1008") == 1
        gone = await post(stack, f"/sessions/{conn}/close")  # it has ended: unknown now
        assert gone.status == 404 and gone.json()["error"] == "no such session"
        assert (await post(stack, "/sessions/nope/close")).status == 404
        assert (await call(stack.admin, "GET", f"/sessions/{conn}/close", token=ADMIN_TOKEN)).status == 405


async def test_close_by_identity_with_the_operators_code_and_reason(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        stack = await start_stack(nursery)
        alices = [await open_client(stack, nursery, "alice") for _ in range(2)]
        bob = await open_client(stack, nursery, "bob")
        reply = await post(stack, "/identities/alice/close", {"code": 4001, "reason": "session revoked: é"})
        assert (reply.status, reply.json()) == (200, {"closed": 2})
        for alice in alices:
            await alice.closed.wait()
            assert (alice.code, alice.reason) == (4001, "session revoked: é")
        assert not bob.closed.is_set()
        assert (await post(stack, "/identities/alice/close")).json() == {"closed": 0}  # none left: not an error
        assert (await post(stack, "/identities/nobody%2Fat%20all/close")).json() == {"closed": 0}
        for body, error in (
            ({"code": 1005}, "not one a proxy may send"),
            ({"code": 1002}, "not one a proxy may send"),
            ({"code": 5000}, "not one a proxy may send"),
            ({"code": "1008"}, "not one a proxy may send"),
            ({"code": True}, "not one a proxy may send"),
            ({"reason": "x" * 124}, "124 bytes"),
            ({"reason": "é" * 62}, "124 bytes"),
            ({"reason": 5}, "must be a string"),
            ({"code": 1008, "why": "x"}, "unknown key 'why'"),
            ([1008], "JSON object"),
        ):
            bad = await post(stack, "/identities/bob/close", body)
            assert bad.status == 400, body
            assert error in str(bad.json()["error"]), (body, bad.body)
        bad = await post(stack, "/sessions/x/close", raw=b"{not json")
        assert bad.status == 400 and "not JSON" in str(bad.json()["error"])
        assert not bob.closed.is_set()  # no 400 closed anything
        assert (await post(stack, "/identities/bob/close", {"reason": "é" * 61})).json() == {"closed": 1}
        await bob.closed.wait()
        assert bob.code == 1008


# -- per-identity caps -----------------------------------------------------------------------------


async def handshake_status(stack: Stack, user: str | None) -> tuple[int, dict[str, str]]:
    """The status the proxy answered a new session of ``user`` with (101: it was admitted)."""
    headers = [("Authorization", f"Bearer {USERS[user]}")] if user else []
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{stack.port}/chat", extra_headers=headers):
            pass
    except ConnectionRejected as exc:
        return exc.status_code, {k.decode().lower(): v.decode() for k, v in exc.headers}
    return 101, {}


async def wait_for(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not predicate():
            await trio.sleep(0.01)


async def test_identity_cap_refuses_with_429_and_retry_after(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    with trio.fail_after(15):
        stack = await start_stack(nursery, limits=LimitsConfig(max_sessions_per_identity=2))
        first = [await open_client(stack, nursery, "alice") for _ in range(2)]
        status, headers = await handshake_status(stack, "alice")
        assert (status, headers.get("retry-after")) == (429, "5")
        await open_client(stack, nursery, "bob")  # bob has his own count
        await open_client(stack, nursery, None, path="/open")  # no identity, no sticky key: not capped
        await open_client(stack, nursery, None, path="/open")
        [line] = [m for m in log_lines(caplog, "refused") if "kind=identity_limit" in m]
        assert "status=429" in line and "identity 'alice': 2 open, max_sessions_per_identity 2" in line
        assert USERS["alice"] not in line
        series = parse_metrics(await get(stack, "/metrics"))
        assert total(series, "wsproxy_refused_total", reason="identity_limit", status="429") == 1
        assert not any(c.closed.is_set() for c in first)
        assert stack.backend.close_codes == []  # nothing of the refused one reached the backend
        await first[0].ws.aclose()
        await wait_for(lambda: len(stack.app.sessions) == 4)
        third = await open_client(stack, nursery, "alice")  # room again once one ended
        assert not third.closed.is_set()


async def test_identity_cap_close_oldest_closes_the_oldest_with_1008_and_admits(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsproxy")
    with trio.fail_after(15):
        limits = LimitsConfig(max_sessions_per_identity=2, on_identity_limit="close_oldest")
        stack = await start_stack(nursery, limits=limits)
        oldest, second = [await open_client(stack, nursery, "alice") for _ in range(2)]
        bob = await open_client(stack, nursery, "bob")
        oldest_id = sessions_of(await get(stack, "/sessions?identity=alice"))[0]["id"]
        newest = await open_client(stack, nursery, "alice")  # admitted, and relays
        await oldest.closed.wait()
        assert (oldest.code, oldest.reason) == (1008, "too many sessions for this identity")
        await wait_for(lambda: stack.backend.close_codes == [1001])
        assert not second.closed.is_set() and not bob.closed.is_set() and not newest.closed.is_set()
        assert await newest.echo("new") == "new"
        assert [s["identity"] for s in sessions_of(await get(stack, "/sessions"))] == ["alice", "bob", "alice"]
        [line] = log_lines(caplog, "identity_limit")
        assert f"conn={oldest_id} " in line and "who=\"identity 'alice'\"" in line and "limit=2" in line
        series = parse_metrics(await get(stack, "/metrics"))
        assert total(series, "wsproxy_sessions_closed_total", outcome="identity_limit") == 1
        assert total(series, "wsproxy_refused_total", reason="identity_limit") == 0


async def test_identity_cap_by_sticky_ip_key_without_auth(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        limits = LimitsConfig(max_sessions_per_identity=1, on_identity_limit="close_oldest")
        stack = await start_stack(nursery, auth=False, limits=limits, sticky_ip=True)
        first = await open_client(stack, nursery)
        second = await open_client(stack, nursery)
        await first.closed.wait()
        assert first.code == 1008
        assert not second.closed.is_set()
        assert [s["identity"] for s in sessions_of(await get(stack, "/sessions"))] == [None]


async def test_a_reload_that_sets_a_cap_counts_the_sessions_already_open(nursery: trio.Nursery) -> None:
    with trio.fail_after(15):
        stack = await start_stack(nursery)  # no cap yet
        alices = [await open_client(stack, nursery, "alice") for _ in range(3)]
        config = stack.app.generation.config
        limits = dataclasses.replace(config.limits, max_sessions_per_identity=2, on_identity_limit="close_oldest")
        stack.app.reload(dataclasses.replace(config, limits=limits))
        newest = await open_client(stack, nursery, "alice")
        await alices[0].closed.wait()
        await alices[1].closed.wait()  # three open plus one new, under a cap of two: the two oldest go
        assert alices[0].code == alices[1].code == 1008
        assert not alices[2].closed.is_set() and not newest.closed.is_set()
        limits = dataclasses.replace(limits, on_identity_limit="refuse")
        stack.app.reload(dataclasses.replace(config, limits=limits))
        assert (await handshake_status(stack, "alice"))[0] == 429
