"""``wsproxy run`` tunes the collector once after start-up, unless WSPROXY_GC=default."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


def test_wsproxy_run_tunes_it_after_start_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real ``wsproxy run`` logs the settings before it serves, then stops on SIGTERM."""
    import os
    import signal

    config = tmp_path / "wsproxy.yaml"
    config.write_text(
        "listeners: [{name: web, bind: '127.0.0.1:0'}]\n"
        "routes: [{pool: main}]\n"
        "pools: {main: {backends: [{address: '127.0.0.1:9'}]}}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsproxy", "run", "-c", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "WSPROXY_GC": ""},
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "event=listening" in line:
                break
        assert any("event=gc thresholds=20000,20,20 frozen=" in line for line in lines), lines
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
