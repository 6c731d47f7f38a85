"""The systemd notify protocol and socket activation, against real sockets.

``Notifier`` sends to a real AF_UNIX datagram socket the test binds, once by
path (in a temporary directory) and once at an abstract address
("@wsproxy-test-<random>"), and every datagram is compared byte for byte.
``listen_fds`` takes real listening sockets: the test opens them, and a
launcher subprocess moves them to fds 3, 4, ... sets ``LISTEN_*`` and execs
the process that calls ``listen_fds``, as systemd does (fds 3+ of the pytest
process itself are not ours to clobber). What is not here: the unit files and
a real systemd (``tests/e2e/test_systemd_units.py``, ``tests/systemd_lab.sh``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from textwrap import dedent

import pytest
import trio
import trio.testing

from wsproxy.control.systemd import NOTIFY_SEND_TIMEOUT_S, Notifier, listen_fds

LOGGER = "wsproxy.control.systemd"


@pytest.fixture(autouse=True)
def _systemd_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture wsproxy.control.systemd, even after a test called wsproxy.log.configure()."""
    monkeypatch.setattr(logging.getLogger("wsproxy"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger=LOGGER)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


class NotifySocket:
    """The manager's end: a bound AF_UNIX datagram socket and the value of $NOTIFY_SOCKET for it."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def environ(self, **more: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value, **more}

    def received(self) -> list[bytes]:
        """Every datagram queued so far."""
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return messages


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for AF_UNIX paths: sun_path holds 108 bytes, more than some tmp_paths leave."""
    path = Path(tempfile.mkdtemp(prefix="wsp-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def path_socket(short_dir: Path) -> Iterator[NotifySocket]:
    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        yield NotifySocket(sock, str(path))


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    name = f"wsproxy-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        yield NotifySocket(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> NotifySocket:
    fixture = "path_socket" if request.param == "path" else "abstract_socket"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


# --- messages -------------------------------------------------------------------


def test_ready_status_stopping(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_environ(notify_socket.environ())
    assert notifier.enabled
    notifier.ready("0 sessions, config generation 1")
    notifier.status("1234 sessions, config generation 7")
    notifier.stopping()
    notifier.send("READY=1", "STATUS=x", "MAINPID=42")
    assert notify_socket.received() == [
        b"READY=1\nSTATUS=0 sessions, config generation 1",
        b"STATUS=1234 sessions, config generation 7",
        b"STOPPING=1",
        b"READY=1\nSTATUS=x\nMAINPID=42",
    ]


def test_reloading_carries_the_monotonic_time(notify_socket: NotifySocket) -> None:
    notifier = Notifier.from_environ(notify_socket.environ())
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [message] = notify_socket.received()
    reloading, monotonic = message.split(b"\n")
    assert reloading == b"RELOADING=1"
    key, _, usec = monotonic.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(usec) <= after


def test_a_field_cannot_inject_another_assignment(path_socket: NotifySocket) -> None:
    notifier = Notifier.from_environ(path_socket.environ())
    notifier.status("two\nREADY=1")
    assert path_socket.received() == [b"STATUS=two READY=1"]


# --- no socket, a gone socket, a full socket ----------------------------------------


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "1000000"}])
async def test_without_notify_socket_everything_is_a_no_op(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environ(environ)
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    notifier.ready("x")
    notifier.reloading()
    notifier.status("x")
    notifier.stopping()
    with trio.fail_after(1):
        await notifier.watchdog()
    assert [r for r in caplog.records if r.name == LOGGER] == []


def test_unsupported_address_disables_notifications(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    notifier.ready("x")
    assert warnings(caplog) == ["event=notify_unsupported socket=vsock:2:1234"]


def test_default_environ_is_os_environ(path_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.env_value)
    Notifier.from_environ().stopping()
    assert path_socket.received() == [b"STOPPING=1"]


def test_socket_gone_never_raises_and_warns_once(short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = short_dir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    sock.close()  # the file stays: ECONNREFUSED
    notifier.status("a")
    path.unlink()  # now ENOENT
    notifier.status("b")
    notifier.ready("c")
    [warning] = warnings(caplog)
    assert warning.startswith(f"event=notify_failed socket={path} error=")
    assert warning.endswith("message=\"STATUS=a\"")
    debug = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.DEBUG]
    assert len(debug) == 2

    # the manager comes back (daemon-reexec): the next send works and says so
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
        again.bind(str(path))
        notifier.status("d")
        assert again.recv(4096) == b"STATUS=d"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        f"event=notify_recovered socket={path}"
    ]


def test_abstract_socket_gone_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": f"@wsproxy-test-{secrets.token_hex(8)}-gone"})
    notifier.ready("x")
    notifier.stopping()
    assert len(warnings(caplog)) == 1


def test_full_manager_queue_costs_at_most_the_send_timeout(
    path_socket: NotifySocket, caplog: pytest.LogCaptureFixture
) -> None:
    """A manager that reads nothing: sends give up after NOTIFY_SEND_TIMEOUT_S, without raising."""
    notifier = Notifier.from_environ(path_socket.environ())
    started = time.monotonic()
    for _ in range(100):  # far more than net.unix.max_dgram_qlen (10 by default)
        notifier.status("x" * 1000)
        if warnings(caplog):
            break
    elapsed_s = time.monotonic() - started
    assert warnings(caplog), "the queue never filled up"
    assert elapsed_s < NOTIFY_SEND_TIMEOUT_S + 1.0
    assert len(path_socket.received()) >= 1


# --- watchdog -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "interval_s"),
    [
        ({"WATCHDOG_USEC": "3000000"}, 1.5),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}, 10.0),
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(path_socket: NotifySocket, extra: dict[str, str], interval_s: float | None) -> None:
    notifier = Notifier.from_environ(path_socket.environ(**extra))
    assert notifier.watchdog_interval_s == interval_s


async def test_watchdog_pings_every_half_timeout(
    path_socket: NotifySocket, autojump_clock: trio.testing.MockClock
) -> None:
    notifier = Notifier.from_environ(path_socket.environ(WATCHDOG_USEC="2000000"))
    assert notifier.watchdog_interval_s == 1.0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.watchdog)
            await trio.sleep(3.5)  # pings at 0, 1, 2 and 3
            nursery.cancel_scope.cancel()
    assert path_socket.received() == [b"WATCHDOG=1"] * 4


async def test_watchdog_of_another_process_sends_nothing(path_socket: NotifySocket) -> None:
    notifier = Notifier.from_environ(path_socket.environ(WATCHDOG_USEC="2000000", WATCHDOG_PID=str(os.getpid() + 1)))
    with trio.fail_after(1):
        await notifier.watchdog()  # returns at once
    assert path_socket.received() == []


# --- listen_fds: environment handling (no fd is touched) -----------------------------


def test_no_listen_variables() -> None:
    environ = {"PATH": "/bin"}
    assert listen_fds(environ) == {}
    assert environ == {"PATH": "/bin"}


@pytest.mark.parametrize(
    "variables",
    [
        {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"},  # another process's fds
        {"LISTEN_PID": "me", "LISTEN_FDS": "two"},
        {"LISTEN_PID": "me", "LISTEN_FDS": "0"},
        {"LISTEN_FDS": "1"},
    ],
)
def test_listen_variables_not_for_us_are_ignored_and_unset(variables: dict[str, str]) -> None:
    if variables.get("LISTEN_PID") == "me":
        variables["LISTEN_PID"] = str(os.getpid())
    environ = {"PATH": "/bin", **variables}
    assert listen_fds(environ) == {}
    assert environ == {"PATH": "/bin"}


def test_unset_false_and_read_only_mappings_keep_the_variables() -> None:
    variables = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    environ = dict(variables)
    assert listen_fds(environ, unset=False) == {}
    assert environ == variables
    assert listen_fds(types.MappingProxyType(environ)) == {}
    assert environ == variables


# --- listen_fds: real sockets passed to a real process -------------------------------

#: Moves the fds named in argv[1:] to 3, 4, ... (via high fds, as they may
#: overlap), sets LISTEN_* for its own pid and execs argv[0]'s script: what
#: systemd does between fork and exec.
LAUNCHER = dedent(
    """\
    import fcntl, os, sys
    names, fds = sys.argv[1], [int(fd) for fd in sys.argv[2:]]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDS"] = str(len(fds))
    if names != "-":
        os.environ["LISTEN_FDNAMES"] = names
    os.execv(sys.executable, [sys.executable, "-c", os.environ.pop("CHECKER")])
    """
)

#: Calls listen_fds() and reports what it got as JSON on stdout.
CHECKER = dedent(
    """\
    import json, os, socket, sys
    from wsproxy.control.systemd import listen_fds
    passed = listen_fds()
    report = {
        "sockets": {
            name: [
                {
                    "fd": s.fileno(),
                    "family": s.family.name,
                    "type": s.type.name,
                    "address": list(s.getsockname()) if isinstance(s.getsockname(), tuple) else s.getsockname(),
                    "blocking": s.getblocking(),
                    "inheritable": s.get_inheritable(),
                    "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1,
                }
                for s in socks
            ]
            for name, socks in passed.items()
        },
        "environ": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "getenv": [os.getenv(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")],
        "again": list(listen_fds()),
    }
    json.dump(report, sys.stdout)
    """
)


def run_activated(names: str, files: list[int]) -> tuple[dict[str, Any], str]:
    """Run CHECKER with ``files`` passed as fds 3, 4, ... and LISTEN_FDNAMES=names ("-": unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["CHECKER"] = CHECKER
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, names, *map(str, files)],
        pass_fds=files, env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def tcp_listener(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock


def ipv6_available() -> bool:
    try:
        tcp_listener("::1").close()
    except OSError:
        return False
    return True


def test_listen_fds_maps_sockets_by_name(short_dir: Path) -> None:
    """Three listeners, one name used twice (v4 + v6 of one listener), one unix socket."""
    public_v4 = tcp_listener()
    public_v6 = tcp_listener("::1") if ipv6_available() else tcp_listener()
    admin = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    admin_path = short_dir / "admin.sock"
    admin.bind(str(admin_path))
    admin.listen()
    opened = [public_v4, admin, public_v6]
    public_addresses = [address(public_v4), address(public_v6)]
    try:
        report, _stderr = run_activated("public:admin:public", [s.fileno() for s in opened])
    finally:
        for sock in opened:
            sock.close()
    sockets = report["sockets"]
    assert list(sockets) == ["public", "admin"]
    assert [s["fd"] for s in sockets["public"]] == [3, 5]
    assert [s["fd"] for s in sockets["admin"]] == [4]
    assert [s["address"][:2] for s in sockets["public"]] == public_addresses
    assert sockets["admin"][0]["address"] == str(admin_path)
    assert sockets["admin"][0]["family"] == "AF_UNIX"
    for sock in sockets["public"] + sockets["admin"]:
        assert sock["type"] == "SOCK_STREAM"
        assert sock["blocking"] is False
        assert sock["inheritable"] is False
        assert sock["listening"] is True
    assert report["environ"] == []
    assert report["getenv"] == [None, None, None]
    assert report["again"] == []


def address(sock: socket.socket) -> list[object]:
    """``getsockname()`` as the JSON report has it: [host, port]."""
    return list(sock.getsockname()[:2])


def test_listen_fds_missing_names_are_unknown() -> None:
    first, second = tcp_listener(), tcp_listener()
    try:
        report, _ = run_activated("-", [first.fileno(), second.fileno()])
        fewer, stderr = run_activated("public", [first.fileno(), second.fileno()])
        empty_name, _ = run_activated(":public", [first.fileno(), second.fileno()])
    finally:
        first.close()
        second.close()
    assert {name: [s["fd"] for s in socks] for name, socks in report["sockets"].items()} == {"unknown": [3, 4]}
    assert {name: [s["fd"] for s in socks] for name, socks in fewer["sockets"].items()} == {
        "public": [3],
        "unknown": [4],
    }
    assert {name: [s["fd"] for s in socks] for name, socks in empty_name["sockets"].items()} == {
        "unknown": [3],
        "public": [4],
    }
    assert fewer["environ"] == []


def test_listen_fds_skips_what_is_not_a_socket() -> None:
    listener = tcp_listener()
    read_end, write_end = os.pipe()
    try:
        report, _ = run_activated("fifo:public", [read_end, listener.fileno()])
        port = listener.getsockname()[1]
    finally:
        listener.close()
        os.close(read_end)
        os.close(write_end)
    assert list(report["sockets"]) == ["public"]
    assert report["sockets"]["public"][0]["address"] == ["127.0.0.1", port]
