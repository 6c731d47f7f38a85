"""The supported install, as an operator does it: a wheel, a venv in /opt/wsproxy, the unit.

- The wheel is built by ``python -m build`` from a copy of this tree (what git
  tracks, plus new files it does not ignore), with ``WSPROXY_NO_MYPYC=1`` so the
  test does not spend a minute of CPU in mypyc (the compiled build is the same
  package plus extensions; ``tests/proto/test_compiled.py`` covers those).
- It must hold everything it runs: every module, the status page, the demo's
  config and cookie key (``python -m wsproxy.demo`` reads them through
  importlib.resources), ``py.typed``; and declare runtime dependencies only.
- Installed into a fresh venv, with nothing else, ``wsproxy run`` proxies a
  real ``websockets`` client to a real backend and stops on SIGTERM.
- In ``../shared/systemd-lab`` (a real systemd 252 as PID 1), the documented
  install (``python3 -m venv /opt/wsproxy && /opt/wsproxy/bin/pip install
  wsproxy-*.whl``, here from a local wheel directory: the lab has no network)
  runs under ``systemd/wsproxy.service`` unchanged: start, a session through
  it, ``systemctl reload``, stop. Skipped, saying why, without root,
  systemd-nspawn or the lab script.

The installs fetch dependencies the way pip is configured on the machine
(PyPI or a local mirror); a machine that can reach neither skips with the
error pip printed.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from textwrap import dedent

import pytest
import websockets.sync.client
import websockets.sync.server

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "wsproxy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LAB = Path(os.environ.get("SYSTEMD_LAB", ROOT.parent / "shared" / "systemd-lab" / "run-unit.sh"))
BUILD_TIMEOUT_S = 300.0
INSTALL_TIMEOUT_S = 300.0

pytestmark = pytest.mark.timeout(900)


def requirement_name(requirement: str) -> str:
    """``"pyjwt[crypto]>=2.10"`` → ``pyjwt`` (normalised as PEP 503 does)."""
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match[0]).lower()


def declared(*extras: str) -> set[str]:
    names = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    for extra in extras:
        names |= {requirement_name(r) for r in PYPROJECT["project"]["optional-dependencies"][extra]}
    return names


# --- what the package imports is declared (no build needed) ---------------------------


def third_party_imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(top-level module, optional) of every absolute import of a non-stdlib module in ``path``.

    An import is optional when it sits in a ``try`` whose handler catches
    ImportError (argcomplete, websockets.speedups' fallback).
    """
    tree = ast.parse(path.read_text())
    optional_nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers
        ):
            for inner in node.body:
                optional_nodes |= {id(n) for n in ast.walk(inner)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top != "wsproxy" and top != "__future__":
                yield top, id(node) in optional_nodes


def test_every_import_of_the_package_is_a_declared_dependency() -> None:
    """The proxy's imports are runtime dependencies; the demo's may be in the ``demo`` extra."""
    import importlib.metadata

    distributions = importlib.metadata.packages_distributions()
    runtime, demo, anywhere = declared(), declared("demo"), declared(*PYPROJECT["project"]["optional-dependencies"])
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        in_demo = "demo" in path.relative_to(PACKAGE).parts
        for module, optional in third_party_imports(path):
            dists = {requirement_name(d) for d in distributions.get(module, [module])}
            allowed = anywhere if optional else demo if in_demo else runtime
            if not dists & allowed:
                missing.append(f"{path.relative_to(ROOT)}: {module} (distribution {sorted(dists)})")
    assert missing == []


def test_test_and_demo_tools_are_not_runtime_dependencies() -> None:
    runtime = declared()
    for tool in ("pytest", "hypothesis", "playwright", "trustme", "mypy", "trio-websocket", "jsonschema", "build"):
        assert tool not in runtime, tool
    assert "wsproto" in runtime  # control/health.py imports it; it used to come only through trio-websocket


# --- the wheel -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``python -m build --wheel`` of a copy of the tree (the checkout itself stays clean)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files belong to the tree")
    source = tmp_path_factory.mktemp("source")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(source)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env={**os.environ, "WSPROXY_NO_MYPYC": "1"},
    )
    if done.returncode != 0 and "Could not find a version" in done.stdout + done.stderr:
        pytest.skip(f"the build requirements cannot be installed here: {done.stdout[-500:]}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "WARNING" not in done.stdout + done.stderr, "the build warns (licence table, package data...)"
    [built] = dist.glob("wsproxy-*.whl")
    return built


def test_the_wheel_holds_everything_it_runs(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        scripts = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    modules = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    for data in ("wsproxy/py.typed", "wsproxy/demo/conf/demo.yaml", "wsproxy/demo/conf/demo-cookie.key",
                 "wsproxy/control/status_page/index.html", "wsproxy/demo/web/index.html"):
        assert data in names, data
    assert not any(n.startswith(("tests/", "conf/", "bench/", "fuzz/")) for n in names)
    assert "wsproxy = wsproxy.__main__:main" in scripts
    unconditional = {requirement_name(line.split(":", 1)[1].strip())
                     for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert unconditional == declared()


def pip_install(python: Path, *args: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0 and re.search(r"No matching distribution|Could not find a version|NewConnectionError",
                                          done.stderr):
        pytest.skip(f"pip cannot fetch the dependencies here: {done.stderr.strip()[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"wsproxy exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout_s} s")


def echo_server() -> tuple[websockets.sync.server.Server, int]:
    def handler(ws: websockets.sync.server.ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    server = websockets.sync.server.serve(handler, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.socket.getsockname()[1])


def test_a_venv_with_the_wheel_alone_runs_the_proxy(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "opt-wsproxy"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    pip_install(python, str(wheel))
    # Not this checkout: no PYTHONPATH, and the working directory (``python -c`` imports from it) elsewhere.
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # Runtime only: the demo's and the tests' tools are not there.
    for absent in ("trio_websocket", "pytest", "playwright"):
        done = subprocess.run([str(python), "-c", f"import {absent}"], capture_output=True, env=clean, timeout=60, cwd=tmp_path)
        assert done.returncode != 0, f"{absent} was installed with the runtime"
    # The demo's config is in the package, next to its cookie key.
    demo = subprocess.run([str(python), "-c", "from importlib.resources import files; "
                           "print(files('wsproxy.demo') / 'conf' / 'demo.yaml')"],
                          capture_output=True, text=True, env=clean, timeout=60, check=True, cwd=tmp_path).stdout.strip()
    assert demo.startswith(str(venv))
    done = subprocess.run([str(venv / "bin" / "wsproxy"), "check", "-c", demo],
                          capture_output=True, text=True, env=clean, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    server, backend_port = echo_server()
    port, admin_port = free_port(), free_port()
    config = tmp_path / "wsproxy.yaml"
    config.write_text(dedent(f"""\
        listeners: [{{name: public, bind: "127.0.0.1:{port}"}}]
        routes: [{{pool: echo}}]
        pools: {{echo: {{backends: [{{address: "127.0.0.1:{backend_port}"}}]}}}}
        shutdown: {{timeout: 2s, spread: 0s}}
        admin: {{bind: "127.0.0.1:{admin_port}"}}
    """))
    proc = subprocess.Popen([str(venv / "bin" / "wsproxy"), "run", "-c", str(config)], env=clean, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port, proc)
        with websockets.sync.client.connect(f"ws://127.0.0.1:{port}/", open_timeout=10) as ws:
            ws.send("through the installed proxy")
            assert ws.recv(timeout=10) == "through the installed proxy"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.shutdown()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert "event=stopped" in stderr, stderr[-2000:]


# --- the documented install under a real systemd ------------------------------------------


def lab_problem() -> str | None:
    if os.geteuid() != 0:
        return "the systemd lab needs root"
    if shutil.which("systemd-nspawn") is None:
        return "no systemd-nspawn (apt-get install -y systemd-container)"
    if not LAB.is_file():
        return f"no systemd lab script at {LAB} (../shared/systemd-lab)"
    return None


LAB_TOOL = '''\
"""In the lab, on the installed venv's python: echo PORT | probe URL (websockets only)."""
import sys
from websockets.sync.client import connect
from websockets.sync.server import serve

def echo(port):
    def handler(ws):
        for message in ws:
            ws.send(message)
    with serve(handler, "127.0.0.1", int(port)) as server:
        server.serve_forever()

def probe(url):
    with connect(url, open_timeout=10) as ws:
        ws.send("hello through systemd")
        assert ws.recv(timeout=10) == "hello through systemd"
    print("probe ok")

command, *args = sys.argv[1:]
{"echo": echo, "probe": probe}[command](*args)
'''

LAB_CONFIG = """\
listeners:
  - name: public
    bind: 127.0.0.1:8080
routes:
  - pool: echo
pools:
  echo:
    backends:
      - address: 127.0.0.1:9001
timeouts:
  idle: {idle}
shutdown: {{timeout: 3s, spread: 0s}}
admin:
  bind: unix:/run/wsproxy/admin.sock
"""


def test_the_documented_install_runs_under_systemd(wheel: Path, tmp_path: Path) -> None:
    problem = lab_problem()
    if problem:
        pytest.skip(problem)
    name = f"wsp-install-{os.getpid()}"
    # The lab has its own network namespace and no network: the dependencies go in as wheels.
    wheels = tmp_path / "lab" / "wheels"
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                           "--wheel-dir", str(wheels), str(wheel)], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0:
        pytest.skip(f"pip cannot fetch the dependencies here: {done.stderr.strip()[-300:]}")
    (tmp_path / "lab" / "tool.py").write_text(LAB_TOOL)
    (tmp_path / "lab" / "good1.yaml").write_text(LAB_CONFIG.format(idle="10m"))
    (tmp_path / "lab" / "good2.yaml").write_text(LAB_CONFIG.format(idle="20m"))
    venv = tmp_path / "opt-wsproxy"  # the lab's /opt/wsproxy
    venv.mkdir()

    def lab(*args: str, check: bool = True, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(LAB), *args], capture_output=True, text=True, timeout=timeout_s)
        if check:
            assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        return done

    def inside(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return lab("exec", "-n", name, "--", *command, check=check)

    def prop(key: str) -> str:
        return lab("ctl", "-n", name, "show", "-p", key, "--value", "wsproxy.service").stdout.strip()

    up = lab("up", "-n", name, "--private-network", "--unit", str(ROOT / "systemd" / "wsproxy.service"),
             "--file", f"{tmp_path / 'lab'}:/opt/lab", "--bind", f"{venv}:/opt/wsproxy", check=False)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        # README, "Install": the venv, the wheel, the user, the config.
        inside("/usr/bin/python3", "-m", "venv", "/opt/wsproxy")
        inside("/opt/wsproxy/bin/pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
               "--find-links", "/opt/lab/wheels", f"/opt/lab/wheels/{wheel.name}")
        inside("systemd-sysusers", "--inline", 'u wsproxy - "wsproxy WebSocket reverse proxy" / /usr/sbin/nologin')
        inside("install", "-d", "-o", "root", "-g", "wsproxy", "-m", "0750", "/etc/wsproxy")
        inside("install", "-o", "root", "-g", "wsproxy", "-m", "0640", "/opt/lab/good1.yaml",
               "/etc/wsproxy/wsproxy.yaml")
        inside("systemd-run", "--quiet", "--unit=lab-echo", "/opt/wsproxy/bin/python", "/opt/lab/tool.py",
               "echo", "9001")
        lab("ctl", "-n", name, "start", "wsproxy.service")
        pid = prop("MainPID")
        assert prop("ActiveState") == "active"
        assert "/opt/wsproxy/bin/wsproxy run" in prop("ExecStart")
        assert "probe ok" in inside("/opt/wsproxy/bin/python", "/opt/lab/tool.py", "probe",
                                    "ws://127.0.0.1:8080/").stdout
        inside("install", "-o", "root", "-g", "wsproxy", "-m", "0640", "/opt/lab/good2.yaml",
               "/etc/wsproxy/wsproxy.yaml")
        lab("ctl", "-n", name, "reload", "wsproxy.service")
        for _ in range(100):
            if prop("StatusText").endswith("config generation 2"):
                break
            time.sleep(0.1)
        assert prop("StatusText").endswith("config generation 2") and prop("MainPID") == pid
        assert "probe ok" in inside("/opt/wsproxy/bin/python", "/opt/lab/tool.py", "probe",
                                    "ws://127.0.0.1:8080/").stdout
        lab("ctl", "-n", name, "stop", "wsproxy.service")
        assert (prop("Result"), prop("ExecMainStatus")) == ("success", "0")
        journal = lab("journal", "-n", name, "-u", "wsproxy.service", "-o", "cat").stdout
        assert "event=reloaded generation=2" in journal, journal[-3000:]
    finally:
        lab("down", "-n", name, check=False, timeout_s=90.0)
