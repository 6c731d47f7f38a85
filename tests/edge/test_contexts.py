"""``edge.contexts``: SSL contexts from the config's TLS data, checked before use, built once per config object.

Configs are YAML files loaded with ``load_checked`` (what every entry point
uses); certificates come from trustme and are written to ``tmp_path``. The
TLS handshakes themselves are tests/e2e/test_tls.py's, and a reload refused
for a bad key is tests/e2e/test_reload.py's.
"""

from __future__ import annotations

import gc
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from tests.kit.tls import Pki, make_pki, pki, q, write_leaf  # noqa: F401 - pki is a fixture
from wsproxy.config.schema import PoolName
from wsproxy.edge import contexts
from wsproxy.edge.contexts import check_contexts, listener_context, load_checked, pool_context
from wsproxy.errors import ConfigErrors


def write(tmp_path: Path, listener_tls: list[str], pool_tls: list[str] | None = None, *, wss_pool: bool = False) -> Path:
    """A config with one TLS listener, a pool ``main`` (with ``pool_tls`` as its tls mapping) and maybe a pool ``wss``."""
    lines = ["listeners:", "  - name: public", "    bind: 127.0.0.1:0", "    tls:"]
    lines += [f"      {line}" for line in listener_tls]
    lines += ["routes:", "  - pool: main", "pools:", "  main:", "    backends:", "      - address: 127.0.0.1:9001"]
    if pool_tls is not None:
        lines += ["    tls:", *(f"      {line}" for line in pool_tls)]
    if wss_pool:  # a wss:// backend without a tls mapping: the system's trust store
        lines += ["  wss:", "    backends:", '      - address: "wss://127.0.0.1:9002"']
    path = tmp_path / "wsproxy.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def line_of(path: Path, text: str) -> int:
    """The line (from 1) where ``text`` first appears in ``path``."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if text in line)


@pytest.fixture
def backend_pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path, "backend")


def test_each_bad_file_is_reported_at_its_tls_mapping(tmp_path: Path, pki: Pki) -> None:
    """As the loader reports its own errors: FILE:LINE:COL: the mapping's YAML path: the file: what is wrong."""
    _, other_key = write_leaf(pki.ca.issue_cert("localhost"), tmp_path, "other")
    junk = tmp_path / "junk-ca.pem"
    junk.write_text("not a CA\n")
    path = write(tmp_path, [f"cert: {q(pki.cert_pem)}", f"key: {q(other_key)}"], [f"ca: {q(junk)}"])
    with pytest.raises(ConfigErrors) as info:
        load_checked(str(path))
    listener, pool = (str(e) for e in info.value.errors)
    assert listener == (
        f"{path}:{line_of(path, 'cert:')}:7: listeners[0].tls: "
        f"{other_key}: the key does not match the certificate {pki.cert_pem}"
    )
    assert pool.startswith(f"{path}:{line_of(path, 'ca:')}:7: pools.main.tls: {junk}: not a usable PEM CA bundle"), pool


def test_certificate_problems_come_with_the_other_errors_of_the_same_file(tmp_path: Path, pki: Pki) -> None:
    """One run of ``wsproxy check`` says everything: a bad key is not held back until the YAML is fixed."""
    _, other_key = write_leaf(pki.ca.issue_cert("localhost"), tmp_path, "other")
    path = write(tmp_path, [f"cert: {q(pki.cert_pem)}", f"key: {q(other_key)}"])
    path.write_text(path.read_text() + "timeouts: {idle: 10}\n")  # a loader error, after the listener
    with pytest.raises(ConfigErrors) as info:
        load_checked(str(path))
    messages = [str(e) for e in info.value.errors]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"{path}:{line_of(path, 'cert:')}:7: listeners[0].tls: {other_key}: the key does not match")
    assert messages[1].startswith(f"{path}:{line_of(path, 'timeouts:')}:") and "timeouts.idle" in messages[1]


def test_a_config_built_by_code_is_reported_without_a_position(tmp_path: Path, pki: Pki) -> None:
    import dataclasses

    config = load_checked(str(write(tmp_path, [f"cert: {q(pki.cert_pem)}", f"key: {q(pki.key_pem)}"])))
    spec = config.listeners[0]
    assert spec.tls is not None
    broken = dataclasses.replace(spec.tls, key=str(tmp_path / "nope.key"), where=None)
    with pytest.raises(ConfigErrors) as info:
        check_contexts(dataclasses.replace(config, listeners=(dataclasses.replace(spec, tls=broken),)))
    assert [str(e) for e in info.value.errors] == [
        f"{config.source}: listeners[0].tls: {tmp_path / 'nope.key'}: cannot read: No such file or directory"
    ]


def test_the_check_builds_every_context_the_config_needs(
    tmp_path: Path, pki: Pki, backend_pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After ``load_checked`` nothing is read or built again: the edge gets what the check built."""
    path = write(tmp_path, [f"cert: {q(pki.cert_pem)}", f"key: {q(pki.key_pem)}"], [f"ca: {q(backend_pki.ca_pem)}"], wss_pool=True)
    config = load_checked(str(path))

    def refuse(*args: object, **kwargs: object) -> ssl.SSLContext:
        raise AssertionError("built after the check")

    monkeypatch.setattr(contexts, "server_context", refuse)
    monkeypatch.setattr(contexts, "client_context", refuse)
    assert config.listeners[0].tls is not None
    assert isinstance(listener_context(config.listeners[0].tls), ssl.SSLContext)
    main, wss = pool_context(config.pools[PoolName("main")]), pool_context(config.pools[PoolName("wss")])
    assert main is not wss and wss.verify_mode is ssl.CERT_REQUIRED and wss.check_hostname


def test_contexts_are_built_once_per_config_object_and_dropped_with_it(tmp_path: Path, pki: Pki, backend_pki: Pki) -> None:
    path = write(tmp_path, [f"cert: {q(pki.cert_pem)}", f"key: {q(pki.key_pem)}"], [f"ca: {q(backend_pki.ca_pem)}"])
    first = load_checked(str(path))
    tls, pool = first.listeners[0].tls, first.pools[PoolName("main")]
    assert tls is not None and pool.tls is not None
    context, client = listener_context(tls), pool_context(pool)
    assert listener_context(tls) is context and pool_context(pool) is client
    # A second load of the same file: equal settings, files read again (a certificate renewed in place).
    second = load_checked(str(path))
    assert second.listeners[0].tls == tls and second.pools[PoolName("main")].tls == pool.tls
    assert second.listeners[0].tls is not None
    assert listener_context(second.listeners[0].tls) is not context
    assert pool_context(second.pools[PoolName("main")]) is not client
    gc.collect()  # what earlier tests left goes now, not below
    cached = len(contexts._contexts)
    del first, tls, pool
    gc.collect()
    assert len(contexts._contexts) == cached - 2  # the first load's listener and pool entries went with it


@pytest.mark.parametrize(("text", "tickets"), [(None, 2), ("30m", 2), ("0", 0)])
def test_the_session_ticket_lifetime_reaches_the_context(tmp_path: Path, pki: Pki, text: str | None, tickets: int) -> None:
    lines = [f"cert: {q(pki.cert_pem)}", f"key: {q(pki.key_pem)}"]
    lines += [f"session_ticket_lifetime: {text}"] if text is not None else []
    tls = load_checked(str(write(tmp_path, lines))).listeners[0].tls
    assert tls is not None
    assert listener_context(tls).num_tickets == tickets
    assert bool(listener_context(tls).options & ssl.OP_NO_TICKET) == (tickets == 0)


def test_wsproxy_check_of_a_tls_config_imports_no_trio(tmp_path: Path, pki: Pki, backend_pki: Pki) -> None:
    """``wsproxy check`` builds and checks every SSL context with ``ssl`` alone: no event loop."""
    clients = trustme.CA()
    clients_ca = tmp_path / "clients-ca.pem"
    clients.cert_pem.write_to_path(str(clients_ca))
    sni_cert, sni_key = write_leaf(pki.ca.issue_cert("chat.example.com"), tmp_path, "sni")
    client_cert, client_key = write_leaf(backend_pki.ca.issue_cert("proxy"), tmp_path, "to-backend")
    listener = [
        f"cert: {q(pki.cert_pem)}",
        f"key: {q(pki.key_pem)}",
        "sni:",
        f'  - {{names: ["chat.example.com"], cert: {q(sni_cert)}, key: {q(sni_key)}}}',
        f"client_ca: {q(clients_ca)}",
        "client_cert: optional",
    ]
    pool = [f"ca: {q(backend_pki.ca_pem)}", "server_name: localhost", f"cert: {q(client_cert)}", f"key: {q(client_key)}"]
    path = write(tmp_path, listener, pool, wss_pool=True)
    code = (
        "import sys\n"
        "from wsproxy.__main__ import main\n"
        "status = main(['check', '-c', sys.argv[1]])\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] in ('trio', 'trio_websocket'))\n"
        "print(status, 'ssl' in sys.modules, loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.splitlines()[-1] == "0 True []", done.stdout + done.stderr
    assert f"{path} is valid" in done.stdout
