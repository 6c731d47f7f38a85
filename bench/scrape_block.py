"""How long a /metrics scrape blocks the event loop: encoded on the loop (before) or off it (now).

    python bench/scrape_block.py [--backends 100] [--seconds 2] [--mode inline,thread,idle]

Runs a real ``App`` (a listener on port 0, ``--backends`` backends in one
pool, each with a few upstream connect/upgrade observations so that every
per-backend family has its buckets), and for each mode, for ``--seconds``:

- a probe task sleeps 1 ms in a loop and records how late each wake-up is:
  the longest lateness is the longest the loop was held by something else;
- a scraper task renders the metrics every 50 ms: ``inline`` calls
  ``App.render_metrics`` (everything on the loop, as GET /metrics did
  before), ``thread`` awaits ``App.render_metrics_off_loop`` (what GET
  /metrics does now), ``idle`` does not scrape (the probe's own noise).

It prints, per mode: scrapes done, the mean wall time of a scrape, and the
probe's lateness (max, p99, median) in milliseconds. Only figures from one run
on a quiet machine compare; the scrape in the thread still competes for the
GIL, in slices of ``sys.getswitchinterval()`` (5 ms).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsproxy.app import App  # noqa: E402
from wsproxy.config.schema import (  # noqa: E402
    Address,
    BackendConfig,
    Config,
    ListenerConfig,
    ListenerName,
    PoolConfig,
    PoolName,
    RouteConfig,
)

PROBE_S = 0.001
SCRAPE_EVERY_S = 0.05


def config(backends: int) -> Config:
    pool = PoolConfig(
        name=PoolName("big"),
        backends=tuple(
            BackendConfig(address=Address("127.0.0.1", 20000 + i), name=f"b-{i}") for i in range(backends)
        ),
    )
    return Config(
        source="<bench>",
        listeners=(ListenerConfig(name=ListenerName("bench"), bind=Address("127.0.0.1", 0)),),
        routes=(RouteConfig(pool=PoolName("big")),),
        pools={PoolName("big"): pool},
    )


async def one_mode(app: App, mode: str, seconds: float) -> dict[str, float]:
    lateness: list[float] = []
    scrape_s: list[float] = []
    deadline = trio.current_time() + seconds

    async def probe() -> None:
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            await trio.sleep(PROBE_S)
            lateness.append(time.perf_counter() - t0 - PROBE_S)

    async def scraper() -> None:
        while trio.current_time() < deadline:
            t0 = time.perf_counter()
            if mode == "inline":
                app.render_metrics()
            elif mode == "thread":
                await app.render_metrics_off_loop()
            else:
                await trio.sleep(0)
            scrape_s.append(time.perf_counter() - t0)
            await trio.sleep(SCRAPE_EVERY_S)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        nursery.start_soon(scraper)
    ordered = sorted(lateness)
    return {
        "scrapes": len(scrape_s) if mode != "idle" else 0,
        "scrape_ms": statistics.mean(scrape_s) * 1000 if mode != "idle" else 0.0,
        "block_max_ms": ordered[-1] * 1000,
        "block_p99_ms": ordered[int(len(ordered) * 0.99)] * 1000,
        "block_p50_ms": ordered[len(ordered) // 2] * 1000,
    }


async def main(backends: int, seconds: float, modes: list[str]) -> None:
    app = App(config(backends))
    async with trio.open_nursery() as nursery:
        await nursery.start(app.serve)
        for i, backend in enumerate(app.generation.config.pools[PoolName("big")].backends):
            for j in range(5):  # every per-backend histogram gets observations in a few buckets
                app.metrics.upstream_connected("big", str(backend.address), 0.0005 * (i % 7 + j))
                app.metrics.upstream_upgraded("big", str(backend.address), 0.001 * (i % 5 + j))
        size = len(app.render_metrics()[1])
        print(f"{backends} backends, exposition {size} bytes, {seconds:g} s per mode")
        print(f"{'mode':8} {'scrapes':>7} {'scrape ms':>9} {'block max ms':>12} {'p99 ms':>7} {'p50 ms':>7}")
        for mode in modes:
            r = await one_mode(app, mode, seconds)
            print(f"{mode:8} {r['scrapes']:7.0f} {r['scrape_ms']:9.2f} {r['block_max_ms']:12.2f}"
                  f" {r['block_p99_ms']:7.2f} {r['block_p50_ms']:7.2f}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--mode", default="idle,inline,thread", help="comma-separated: idle, inline, thread")
    args = parser.parse_args()
    trio.run(main, args.backends, args.seconds, args.mode.split(","))
