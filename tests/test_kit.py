"""The test kit's own rules and guarantees (``tests/kit``).

- No test module imports another (nor does the kit import a test module):
  what tests share lives in ``tests/kit``. Every import counts, also one
  inside a function or under ``TYPE_CHECKING``.
- ``until`` fails naming what it waited for and for how long; ``SLACK_S``
  scales with ``WSPROXY_TEST_SLACK``.
- The frame codec matches RFC 6455 §5.7's examples byte for byte.
- ``run_wsproxy`` reaps its process even when the test is cancelled.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.kit.process import ROOT, WsproxyProcess, accepts, child_env, run_wsproxy, write_config
from tests.kit.servers import closed_port
from tests.kit.wait import until
from tests.kit.ws import OP_TEXT, frame, parse_frames

TESTS = ROOT / "tests"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def forbidden_imports(source: str, module: str) -> list[str]:
    """Every module that ``source`` (the text of ``module``) imports and that is a test module."""
    package = module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, *([base] if base else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        found += [t for t in targets if t.split(".")[0] == "tests" and t.split(".")[-1].startswith("test_")]
    return found


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("from .test_handshake import BASE", "tests.proto.test_routing", ["tests.proto.test_handshake"]),
        ("def f():\n    from tests.e2e.test_reload import pool", "tests.e2e.test_admin", ["tests.e2e.test_reload"]),
        ("if TYPE_CHECKING:\n    import tests.e2e.test_cli", "tests.e2e.test_x", ["tests.e2e.test_cli"]),
        ("from tests.e2e import test_relay", "tests.e2e.test_leaks", ["tests.e2e.test_relay"]),
        ("from ..kit.ws import frame\nfrom tests.kit import wait", "tests.e2e.test_x", []),
    ],
)
def test_the_import_rule_sees_every_form_of_import(source: str, module: str, expected: list[str]) -> None:
    assert forbidden_imports(source, module) == expected


def test_no_test_module_imports_another_and_the_kit_imports_none() -> None:
    checked = [*TESTS.rglob("test_*.py"), *(TESTS / "kit").rglob("*.py")]
    assert len(checked) > 50  # the walk found the suite
    offenders = {
        str(path.relative_to(ROOT)): bad
        for path in checked
        if (bad := forbidden_imports(path.read_text(), module_name(path)))
    }
    assert offenders == {}, "move what they share into tests/kit"


async def test_until_fails_naming_what_it_waited_for_and_how_long() -> None:
    with pytest.raises(AssertionError, match=r"^timed out after 0\.\d\ds waiting for the door: shut$"):
        await until(lambda: False, timeout_s=0.05, what="the door", show=lambda: "shut")
    flips = iter([False, False, True])
    started = trio.current_time()
    held_at = await until(lambda: next(flips), poll_s=0.01)
    assert started + 0.02 <= held_at <= trio.current_time()


def test_slack_scales_with_the_environment() -> None:
    code = "from tests.kit.wait import SLACK_S; print(SLACK_S)"
    for factor, expected in (("1", 0.3), ("3", 0.9)):
        env = child_env({**os.environ, "WSPROXY_TEST_SLACK": factor})
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30, check=True)
        assert float(out.stdout) == pytest.approx(expected)


def test_the_codec_matches_the_examples_of_rfc_6455() -> None:
    # §5.7: a single-frame unmasked and masked text message containing "Hello"
    assert frame(OP_TEXT, b"Hello") == bytes.fromhex("810548656c6c6f")
    masked = bytes.fromhex("818537fa213d7f9f4d5158")
    assert frame(OP_TEXT, b"Hello", mask=bytes.fromhex("37fa213d")) == masked
    # §5.7: 256 bytes and 64 KiB binary messages in a single unmasked frame
    assert frame(0x2, b"\0" * 256)[:4] == bytes.fromhex("827e0100")
    assert frame(0x2, b"\0" * 65536)[:10] == bytes.fromhex("827f0000000000010000")
    [parsed] = parse_frames(masked)
    assert (parsed.opcode, parsed.payload, parsed.masked, parsed.fin) == (OP_TEXT, b"Hello", True, True)


async def test_run_wsproxy_reaps_the_process_when_the_test_is_cancelled(tmp_path: Path) -> None:
    port, backend = closed_port(), closed_port()
    config = write_config(tmp_path, f"""\
        listeners: [{{name: public, bind: "127.0.0.1:{port}"}}]
        routes: [{{pool: echo}}]
        pools: {{echo: {{backends: [{{address: "127.0.0.1:{backend}"}}]}}}}
        """)  # fmt: skip
    proxy: WsproxyProcess
    with trio.move_on_after(30) as scope:
        async with run_wsproxy(config, kind=WsproxyProcess, port=port) as proxy:
            scope.cancel()  # the test "fails" here, the proxy still running
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert proxy.proc.returncode == 0, proxy.log()  # SIGTERM: a clean exit, and reaped
    assert not await accepts(port)
