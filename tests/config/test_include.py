"""The config loader's ergonomics and hygiene: include, ${VAR}, overlaps, shadowed routes, TLS files, --dump.

Pure tests of ``config.load`` on files in ``tmp_path`` (no event loop), and
one ``wsproxy check`` subprocess that shows the same errors as an operator
sees them. Each error is checked with its file, line, column and YAML path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from textwrap import dedent

import pytest
import yaml

from wsproxy.cli import REDACTED, dump
from wsproxy.config.load import load_admin, load_config
from wsproxy.errors import ConfigErrors

MAIN = """\
    include: ["conf.d/*.yaml"]
    listeners:
      - {name: public, bind: "127.0.0.1:8080"}
    routes:
      - {path: /chat, pool: chat}
    pools:
      chat: {backends: [{address: "127.0.0.1:9001"}]}
    """


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(text))
    return path


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))
    return [str(error) for error in info.value.errors]


# -- include ---------------------------------------------------------------------------------------


def test_included_files_append_listeners_and_routes_and_merge_pools(tmp_path: Path) -> None:
    main = write(tmp_path / "wsproxy.yaml", MAIN)
    write(tmp_path / "conf.d/b-echo.yaml", """\
        routes: [{pool: echo}]
        pools: {echo: {backends: [{address: "127.0.0.1:9002"}]}}
        """)
    write(tmp_path / "conf.d/a-admin.yaml", """\
        listeners: [{name: internal, bind: "127.0.0.1:8081"}]
        timeouts: {idle: 1m}
        """)
    write(tmp_path / "conf.d/ignored.yml", "nonsense: [")
    config = load_config(str(main))
    assert [listener.name for listener in config.listeners] == ["public", "internal"]
    assert [(route.path, route.pool) for route in config.routes] == [("/chat", "chat"), ("/", "echo")]
    assert sorted(config.pools) == ["chat", "echo"]
    assert config.timeouts.idle_s == 60


def test_a_section_or_pool_defined_twice_is_located_in_both_files(tmp_path: Path) -> None:
    main = write(tmp_path / "wsproxy.yaml", MAIN + "timeouts: {idle: 1m}\n")
    included = write(tmp_path / "conf.d/x.yaml", """\
        pools:
          chat: {backends: [{address: "127.0.0.1:9009"}]}
        timeouts: {idle: 2m}
        """)
    assert errors_of(main) == [
        f'{included}:2:3: pools: duplicate key "chat" (first at {main}:7)',
        f'{included}:3:1: section "timeouts" is defined twice (first at {main}:8); only listeners and routes are'
        " appended and pools merged",
    ]


def test_errors_in_an_included_file_are_located_in_it(tmp_path: Path) -> None:
    main = write(tmp_path / "wsproxy.yaml", MAIN)
    included = write(tmp_path / "conf.d/x.yaml", """\
        pools:
          echo:
            backends: [{address: "127.0.0.1:notaport"}]
        include: [more.yaml]
        """)
    bad = write(tmp_path / "conf.d/y.yaml", "routes: [{pool: [\n")
    found = errors_of(main)
    assert found[0].startswith(f"{included}:3:26: pools.echo.backends[0].address: ")
    assert found[1] == f"{included}:4:1: include: an included file cannot include further files"
    assert found[2].startswith(f"{bad}:2:1: invalid YAML")
    assert len(found) == 3


def test_a_missing_include_without_wildcards_is_an_error_at_its_pattern(tmp_path: Path) -> None:
    main = write(tmp_path / "wsproxy.yaml", MAIN.replace('["conf.d/*.yaml"]', '["conf.d/*.yaml", "extra.yaml"]'))
    assert errors_of(main) == [
        f"{main}:1:28: include: cannot read {tmp_path / 'extra.yaml'}: No such file or directory"
    ]


def test_relative_files_in_an_included_file_are_relative_to_it(tmp_path: Path) -> None:
    main = write(tmp_path / "wsproxy.yaml", MAIN + "admin: {bind: '127.0.0.1:9090', token_file: missing.token}\n")
    assert "conf.d" not in errors_of(main)[0]
    main.write_text(dedent(MAIN))
    write(tmp_path / "conf.d/admin.yaml", "admin: {bind: '127.0.0.1:9090', token_file: admin.token}\n")
    write(tmp_path / "conf.d/admin.token", "token-in-conf-d-0123456789\n")
    admin = load_admin(str(main))
    assert admin is not None and admin.token == b"token-in-conf-d-0123456789"


# -- ${VAR} --------------------------------------------------------------------------------------


def test_variables_are_substituted_and_typed_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSP_PORT", "8088")
    monkeypatch.setenv("WSP_RETRIES", "3")
    monkeypatch.delenv("WSP_UNSET", raising=False)
    main = write(tmp_path / "wsproxy.yaml", """\
        listeners: [{name: public, bind: "127.0.0.1:${WSP_PORT}"}]
        routes: [{pool: echo}]
        admin: {bind: "unix:/run/wsproxy/$${literal}.sock"}
        pools:
          echo:
            retries: ${WSP_RETRIES}
            backends: [{address: "${WSP_UNSET:-127.0.0.1}:9001"}]
        """)
    config = load_config(str(main))
    assert config.listeners[0].bind.port == 8088
    assert config.pools["echo"].retries == 3  # type: ignore[index]
    assert str(config.pools["echo"].backends[0].address) == "127.0.0.1:9001"  # type: ignore[index]
    assert config.admin is not None and config.admin.unix_path == "/run/wsproxy/${literal}.sock"  # "$$" is a "$"


def test_an_unset_variable_is_a_located_error_not_a_misleading_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WSP_BACKEND", raising=False)
    main = write(tmp_path / "wsproxy.yaml", """\
        listeners: [{name: public, bind: "127.0.0.1:8080"}]
        routes: [{pool: echo}]
        pools: {echo: {backends: [{address: "${WSP_BACKEND}"}]}}
        """)
    found = errors_of(main)
    assert found[0] == (
        f'{main}:3:37: pools.echo.backends[0].address: environment variable WSP_BACKEND is not set (in "${{WSP_BACKEND}}"; ${{WSP_BACKEND:-default}}'
        " gives a default)"
    )
    assert not any("IPv6" in error for error in found), found


# -- hygiene -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "overlap"),
    [
        ("0.0.0.0:8080", "127.0.0.1:8080", True),
        ("127.0.0.1:8080", "0.0.0.0:8080", True),
        ("[::]:8080", "[::1]:8080", True),
        ("localhost:8080", "0.0.0.0:8080", True),
        ("0.0.0.0:8080", "[::]:8080", False),  # IPv6 sockets are bound IPV6_V6ONLY
        ("127.0.0.1:8080", "127.0.0.2:8080", False),
        ("0.0.0.0:8080", "127.0.0.1:8081", False),
    ],
)
def test_overlapping_binds(tmp_path: Path, first: str, second: str, overlap: bool) -> None:
    main = write(tmp_path / "wsproxy.yaml", f"""\
        listeners:
          - {{name: a, bind: "{first}"}}
          - {{name: b, bind: "{second}"}}
        routes: [{{pool: echo}}]
        pools: {{echo: {{backends: [{{address: "127.0.0.1:9001"}}]}}}}
        """)
    if not overlap:
        load_config(str(main))
        return
    shown = {"[::]:8080": "[::]:8080"}.get(first, first)
    assert errors_of(main) == [
        f"{main}:3:21: listeners[1].bind: {second} overlaps {shown} (listeners[0].bind, line 2): both hold the same"
        " port on the same address, so one cannot be bound"
    ]


def test_the_admin_bind_cannot_overlap_a_listener(tmp_path: Path) -> None:
    main = write(tmp_path / "wsproxy.yaml", """\
        listeners: [{name: a, bind: "0.0.0.0:9090"}]
        routes: [{pool: echo}]
        pools: {echo: {backends: [{address: "127.0.0.1:9001"}]}}
        admin: {bind: "127.0.0.1:9090"}
        """)
    assert errors_of(main)[0].startswith(f"{main}:4:15: admin.bind: 127.0.0.1:9090 overlaps 0.0.0.0:9090")


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        ("{pool: echo}", "{pool: echo}", True),
        ("{path: /, pool: echo}", "{path: /chat, pool: echo}", True),
        ("{path: /chat, pool: echo}", "{path: /chat/room, pool: echo}", True),
        ("{host: '*.example.com', pool: echo}", "{host: a.example.com, path: /x, pool: echo}", True),
        ("{host: '*.example.com', pool: echo}", "{host: '*.a.example.com', pool: echo}", True),
        ("{path: /chat, pool: echo}", "{pool: echo}", False),
        ("{path: /chat, pool: echo}", "{path: /chatroom, pool: echo}", False),
        ("{host: a.example.com, pool: echo}", "{host: '*.example.com', pool: echo}", False),
        ("{host: '*.example.com', pool: echo}", "{host: example.com, pool: echo}", False),
        # subprotocol is a match key: an earlier route without it covers every offer...
        ("{path: /graphql, pool: echo}", "{path: /graphql, subprotocol: graphql-ws, pool: echo}", True),
        # ...one with the same subprotocol covers the later one, another subprotocol does not
        ("{subprotocol: graphql-ws, pool: echo}", "{path: /graphql, subprotocol: graphql-ws, pool: echo}", True),
        ("{subprotocol: graphql-transport-ws, pool: echo}", "{subprotocol: graphql-ws, pool: echo}", False),
        ("{subprotocol: graphql-ws, pool: echo}", "{pool: echo}", False),
    ],
)
def test_a_route_shadowed_by_an_earlier_one(tmp_path: Path, earlier: str, later: str, shadowed: bool) -> None:
    main = write(tmp_path / "wsproxy.yaml", f"""\
        listeners: [{{name: a, bind: "127.0.0.1:8080"}}]
        routes:
          - {earlier}
          - {later}
        pools: {{echo: {{backends: [{{address: "127.0.0.1:9001"}}]}}}}
        """)
    if not shadowed:
        load_config(str(main))
        return
    (error,) = errors_of(main)
    assert error.startswith(f"{main}:4:5: routes[1]: this route never matches: routes[0] (line 3, host ")
    assert error.endswith("comes first and takes every request it would; put the narrower route first")


def test_every_missing_tls_file_is_reported_at_its_own_key(tmp_path: Path) -> None:
    main = write(tmp_path / "wsproxy.yaml", """\
        listeners:
          - name: a
            bind: "127.0.0.1:8443"
            tls:
              cert: cert.pem
              key: key.pem
              client_ca: ca.pem
              sni: [{names: [a.example], cert: a.pem, key: a.key}]
        routes: [{pool: echo}]
        pools: {echo: {backends: [{address: "127.0.0.1:9001"}]}}
        """)
    found = errors_of(main)
    positions = [error.split(": ")[0].removeprefix(f"{main}:") + " " + error.split(": ")[1] for error in found]
    assert positions == [
        "5:13 listeners[0].tls.cert",
        "6:12 listeners[0].tls.key",
        "7:18 listeners[0].tls.client_ca",
        "8:40 listeners[0].tls.sni[0].cert",
        "8:52 listeners[0].tls.sni[0].key",
    ], found
    assert all("No such file or directory" in error for error in found)


def test_check_shows_the_hygiene_errors(tmp_path: Path) -> None:
    main = write(tmp_path / "wsproxy.yaml", """\
        listeners: [{name: a, bind: "0.0.0.0:8080"}, {name: b, bind: "127.0.0.1:8080"}]
        routes: [{pool: echo}, {path: /chat, pool: echo}]
        pools: {echo: {backends: [{address: "${WSP_NOT_SET_ANYWHERE}:9001"}]}}
        """)
    done = subprocess.run(
        [sys.executable, "-m", "wsproxy", "check", "-c", str(main)], capture_output=True, timeout=30, check=False
    )
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 1
    assert [line.split(": ")[1] for line in lines[:-1]] == ["listeners[1].bind", "routes[1]", "pools.echo.backends[0].address"], lines
    assert lines[-1] == f"wsproxy: 3 error(s) in {main}"


# -- check --dump --------------------------------------------------------------------------------


def test_dump_fills_in_defaults_and_redacts_secrets(tmp_path: Path) -> None:
    write(tmp_path / "admin.token", "dump-token-0123456789abcdef\n")
    write(tmp_path / "cookie.key", "cookie-secret-0123456789abcdef\n")
    main = write(tmp_path / "wsproxy.yaml", """\
        listeners: [{name: a, bind: "127.0.0.1:8080"}]
        routes: [{pool: echo}]
        pools:
          echo:
            sticky: {key: "cookie:wsp", cookie: {secret_file: cookie.key}}
            backends: [{address: "127.0.0.1:9001"}]
        admin: {bind: "127.0.0.1:9090", token_file: admin.token}
        """)
    text = dump(load_config(str(main)))
    assert "dump-token" not in text and "cookie-secret" not in text
    document = yaml.safe_load(text)
    assert document["admin"]["token"] == REDACTED
    assert document["pools"]["echo"]["sticky"]["cookie"]["secret"] == REDACTED
    assert document["timeouts"]["idle_s"] > 0  # a default, not in the file
    assert document["listeners"][0]["bind"] == "127.0.0.1:8080"
    done = subprocess.run(
        [sys.executable, "-m", "wsproxy", "check", "--dump", "-c", str(main)], capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0 and done.stdout.decode() == text
