"""``wsproxy run`` tunes the collector once after start-up, unless WSPROXY_GC=default."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit.process import run_wsproxy

PROBE = (
    "import gc, logging, sys;"
    "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s');"
    "before = gc.get_freeze_count();"
    "from wsproxy.control import gc_tuning; gc_tuning.tune();"
    "print('RESULT', gc.get_threshold(), gc.get_freeze_count() > before)"
)


@pytest.mark.parametrize(("env", "expected"), [({}, "RESULT (20000, 20, 20) True"), ({"WSPROXY_GC": "default"}, "RESULT (700, 10, 10) False")])
def test_gc_is_tuned_unless_told_not_to(env: dict[str, str], expected: str) -> None:
    import os

    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert expected in out, out
    assert "event=gc thresholds=" in out


async def test_wsproxy_run_tunes_it_after_start_up(tmp_path: Path) -> None:
    """A real ``wsproxy run`` logs the settings before it serves, then stops on SIGTERM."""
    config = tmp_path / "wsproxy.yaml"
    config.write_text(
        "listeners: [{name: web, bind: '127.0.0.1:0'}]\n"
        "routes: [{pool: main}]\n"
        "pools: {main: {backends: [{address: '127.0.0.1:9'}]}}\n"
    )
    async with run_wsproxy(config, env={**os.environ, "WSPROXY_GC": ""}, stop_timeout_s=20) as proxy:
        log = await proxy.wait_log("event=listening")
        lines = log.partition("event=listening")[0].splitlines()  # what came before it served
        assert any("event=gc thresholds=20000,20,20 frozen=" in line for line in lines), lines
        proxy.signal(signal.SIGTERM)
        assert await proxy.wait_exit(20) == 0, proxy.log()
