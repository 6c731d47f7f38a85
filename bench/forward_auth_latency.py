"""The latency a forward-auth subrequest adds to an upgrade: wsproxy's h11 client vs httpx.

Question (issue 17 item 4): should ``edge/forward_auth.py``'s hand-written h11
client move to httpx? Only if that removes code without adding latency. This
script runs a local auth service (trio + h11, the one the tests use, answering
200 to every subrequest) and times, sequentially, N subrequests of each kind:

- ``h11``: ``ForwardAuth.check`` as the gate calls it (cache off: every check
  asks the service; one connection per subrequest, ``Connection: close``);
- ``httpx-new``: the same GET with a new ``httpx.AsyncClient`` per subrequest
  (what a drop-in replacement with no shared state does);
- ``httpx-pool``: one shared ``httpx.AsyncClient`` (keep-alive to the service:
  what httpx is usually used for; the service closes after each answer, as
  wsproxy asks it to, so the pool reconnects each time unless it keeps it).

It prints the median, p90 and p99 in microseconds and the CPU per subrequest
of this process. Run it on a quiet machine, one kind after the other:

    PYTHONPATH=. .venv/bin/python bench/forward_auth_latency.py --seconds 5
    PYTHONPATH=. .venv/bin/python bench/forward_auth_latency.py --seconds 0.5   # smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import h11
import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.authservice import allow, auth_service  # noqa: E402
from wsproxy.config.schema import ForwardAuthConfig  # noqa: E402
from wsproxy.edge.forward_auth import ForwardAuth  # noqa: E402
from wsproxy.proto.handshake import Upgrade  # noqa: E402

REQUEST = h11.Request(
    method="GET",
    target="/chat?room=1",
    headers=[
        ("Host", "chat.example.com"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
        ("Cookie", "session=abc"),
    ],
)


async def timed(kind: str, url: str, seconds: float) -> list[float]:
    samples: list[float] = []
    forward = ForwardAuth(ForwardAuthConfig(url=url, send_headers=("Cookie",), cache_s=0.0))
    upgrade = Upgrade(
        request=REQUEST, host="chat.example.com", path="/chat", key=b"dGhlIHNhbXBsZSBub25jZQ==",
        target=b"/chat?room=1", authority=b"chat.example.com",
    )
    headers = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/chat?room=1", "Cookie": "session=abc", "Connection": "close"}
    shared = httpx.AsyncClient(timeout=5, trust_env=False) if kind == "httpx-pool" else None
    end = time.perf_counter() + seconds
    try:
        while time.perf_counter() < end:
            start = time.perf_counter()
            if kind == "h11":
                verdict = await forward.check(upgrade, client_ip="127.0.0.1", host_header=b"chat.example.com", tls=False)
                assert type(verdict).__name__ == "Allowed", verdict
            elif kind == "httpx-new":
                async with httpx.AsyncClient(timeout=5, trust_env=False) as client:
                    assert (await client.get(url, headers=headers)).status_code == 200
            else:
                assert shared is not None
                assert (await shared.get(url, headers=headers)).status_code == 200
            samples.append(time.perf_counter() - start)
    finally:
        if shared is not None:
            await shared.aclose()
    return samples


async def main(seconds: float) -> None:
    async with auth_service(allow()) as service:
        url = service.url()
        for kind in ("h11", "httpx-new", "httpx-pool"):
            cpu = time.process_time()
            samples = await timed(kind, url, seconds)
            cpu = time.process_time() - cpu
            q = statistics.quantiles(samples, n=100)
            print(
                f"{kind:10s} n={len(samples):6d}  p50={statistics.median(samples) * 1e6:7.0f} us  "
                f"p90={q[89] * 1e6:7.0f} us  p99={q[98] * 1e6:7.0f} us  cpu/req={cpu / len(samples) * 1e6:6.0f} us "
                "(client and service in this process)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per kind (default 5)")
    trio.run(main, parser.parse_args().seconds)
