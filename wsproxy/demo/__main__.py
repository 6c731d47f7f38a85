"""``make demo``: two echo backends and the proxy in front of them, until Ctrl-C.

The backends run in this process; the proxy runs as the real ``wsproxy run``
command in a child process with ``conf/demo.yaml``, exactly as an operator
would run it, so its log lines are the ones you would see in production.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from .backends import serve_echo

ROOT = Path(__file__).resolve().parents[2]


async def _wait_for_port(host: str, port: int, timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def run(config: Path) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-5s %(name)s %(message)s")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_echo, "echo-1", "127.0.0.1", 9001)
            await nursery.start(serve_echo, "echo-2", "127.0.0.1", 9002)
            # Its own session: Ctrl-C reaches only us, and we forward one SIGTERM (a second
            # signal would make wsproxy skip the graceful close).
            proxy = subprocess.Popen(
                [sys.executable, "-m", "wsproxy", "run", "-c", str(config)], start_new_session=True
            )
            try:
                await _wait_for_port("127.0.0.1", 8080, 10)
                print(
                    "\n"
                    "  wsproxy is listening on ws://127.0.0.1:8080/ in front of two echo backends\n"
                    "  (127.0.0.1:9001 weight 1, 127.0.0.1:9002 weight 2).\n\n"
                    "  Connect with:   .venv/bin/python -m websockets ws://127.0.0.1:8080/\n"
                    "  Each new connection is greeted by the backend that got it; type a line, it comes back.\n"
                    "  Config: conf/demo.yaml    Stop: Ctrl-C\n",
                    flush=True,
                )

                async def stop_on_signal() -> None:
                    async for _ in signals:
                        if proxy.poll() is None:
                            proxy.send_signal(signal.SIGTERM)  # graceful: sessions get 1001
                        return

                nursery.start_soon(stop_on_signal)
                while proxy.poll() is None:
                    await trio.sleep(0.2)
                return proxy.returncode
            finally:
                if proxy.poll() is None:
                    proxy.send_signal(signal.SIGTERM)
                    with trio.move_on_after(10):
                        while proxy.poll() is None:
                            await trio.sleep(0.05)
                    if proxy.poll() is None:
                        proxy.kill()
                nursery.cancel_scope.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m wsproxy.demo")
    parser.add_argument("-c", "--config", type=Path, default=ROOT / "conf" / "demo.yaml")
    args = parser.parse_args()
    return trio.run(run, args.config)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
