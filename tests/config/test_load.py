"""Tests for the YAML config loader: pure, no event loop, no files except under tmp_path."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from wsproxy.config.durations import parse_size
from wsproxy.config.load import load_config, parse_address, parse_config, parse_duration
from wsproxy.config.schema import (
    Address,
    BackendConfig,
    LimitsConfig,
    ListenerConfig,
    ListenerName,
    PoolName,
    RouteConfig,
    TimeoutsConfig,
)
from wsproxy.errors import ConfigError, ConfigErrors

REFERENCE = Path(__file__).parents[2] / "conf" / "wsproxy.yaml"
ECHO = PoolName("echo")

#: The smallest valid config: nine lines, so that a section appended to it starts on line 10.
MINIMAL = """\
listeners:
  - name: public
    bind: 127.0.0.1:8080
routes:
  - pool: echo
pools:
  echo:
    backends:
      - address: 127.0.0.1:9001
"""


def errors_in(text: str) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as info:
        parse_config(dedent(text), "t.yaml")
    return info.value.errors


def error_in(text: str) -> ConfigError:
    """The one error in ``text``; fails if there are more."""
    errors = errors_in(text)
    assert len(errors) == 1, "\n".join(map(str, errors))
    return errors[0]


# --- valid configs -----------------------------------------------------------


def test_reference_config_loads_with_the_schema_defaults() -> None:
    config = load_config(str(REFERENCE))
    assert config.source == str(REFERENCE)
    public = ListenerConfig(name=ListenerName("public"), bind=Address("127.0.0.1", 8080))
    assert config.listeners == (public,)
    assert config.routes == (RouteConfig(host="*", path="/", pool=ECHO),)
    assert config.pools[ECHO].balance == "round_robin"
    assert config.pools[ECHO].backends == (
        BackendConfig(address=Address("127.0.0.1", 9001), weight=1),
        BackendConfig(address=Address("127.0.0.1", 9002), weight=2),
    )
    # The reference shows every default; if schema.py changes one, this says which.
    assert config.timeouts == TimeoutsConfig()
    assert config.limits == LimitsConfig()


def test_minimal_config_gets_the_defaults() -> None:
    config = parse_config(MINIMAL, "t.yaml")
    assert config.routes == (RouteConfig(pool=ECHO),)
    assert config.pools[ECHO].name == "echo"
    assert config.pools[ECHO].backends == (BackendConfig(address=Address("127.0.0.1", 9001)),)
    assert config.timeouts == TimeoutsConfig()
    assert config.limits == LimitsConfig()


def test_every_value_is_converted() -> None:
    config = parse_config(
        dedent(
            """\
            listeners:
              - {name: public.v6, bind: "[::]:0"}
              - {name: internal_1, bind: "0.0.0.0:0"}
            routes:
              - {host: "*.Chat.Example.com", path: /chat, pool: chat}
              - {host: API.example.com, pool: chat}
            pools:
              chat:
                backends:
                  - {address: "[2001:db8::0001]:9000", weight: 1000}
                  - {address: Backend.Internal:9000, weight: 0x10}
            timeouts: {handshake: 250ms, connect: 1.5s, upstream_handshake: 1m30s, idle: 1d}
            limits: {max_header_bytes: 1024, max_message_bytes: 0}
            """
        ),
        "t.yaml",
    )
    # Two port-0 binds are not duplicates: each gets a port of its own.
    assert [listener.bind for listener in config.listeners] == [
        Address("::", 0),
        Address("0.0.0.0", 0),
    ]
    assert [route.host for route in config.routes] == ["*.chat.example.com", "api.example.com"]
    assert config.pools[PoolName("chat")].backends == (
        BackendConfig(address=Address("2001:db8::1", 9000), weight=1000),
        BackendConfig(address=Address("backend.internal", 9000), weight=16),
    )
    assert config.timeouts == TimeoutsConfig(
        handshake_s=0.25, connect_s=1.5, upstream_handshake_s=90.0, idle_s=86400.0
    )
    assert config.limits == LimitsConfig(max_header_bytes=1024, max_message_bytes=0)


def test_empty_sections_keep_their_defaults() -> None:
    config = parse_config(MINIMAL + "timeouts:\nlimits: {}\n", "t.yaml")
    assert config.timeouts == TimeoutsConfig()
    assert config.limits == LimitsConfig()


def test_yaml_merge_keys_are_expanded() -> None:
    config = parse_config(
        dedent(
            """\
            listeners:
              - {name: public, bind: "127.0.0.1:8080"}
            routes:
              - pool: echo
            pools:
              echo:
                backends:
                  - &heavy {address: "10.0.0.1:9000", weight: 5}
                  - {<<: *heavy, address: "10.0.0.2:9000"}
            """
        ),
        "t.yaml",
    )
    assert [backend.weight for backend in config.pools[ECHO].backends] == [5, 5]


# --- errors, with the exact line an operator sees -----------------------------


def test_bad_backend_address() -> None:
    text = """\
        listeners:
          - name: public
            bind: 127.0.0.1:8080
        routes:
          - pool: chat
        pools:
          chat:
            backends:
              - address: 10.0.0.1:9000
              - address: 10.0.0.2:9000
              - address: chat-3
        """
    assert str(error_in(text)) == (
        't.yaml:11:18: pools.chat.backends[2].address: expected "host:port", got "chat-3"'
    )


def test_unknown_key() -> None:
    text = """\
        listeners:
          - name: public
            bind: 127.0.0.1:8080
        routes:
          - pool: echo
        pools:
          echo:
            backends:
              - backend: 127.0.0.1:9001
                address: 127.0.0.1:9001
        """
    assert str(error_in(text)) == (
        't.yaml:9:9: pools.echo.backends[0]: '
        'unknown key "backend" (expected one of: address, weight, max_connections, name)'
    )


def test_bad_duration() -> None:
    assert str(error_in(MINIMAL + "timeouts:\n  idle: 10 seconds\n")) == (
        't.yaml:11:9: timeouts.idle: expected a duration like "250ms", "10s", "5m", "1h", '
        'got "10 seconds"'
    )


def test_route_to_undefined_pool() -> None:
    text = MINIMAL.replace("  - pool: echo", "  - pool: chat")
    assert str(error_in(text)) == (
        't.yaml:5:11: routes[0].pool: route names pool "chat", which is not defined'
    )


def test_duplicate_listener_name() -> None:
    text = """\
        listeners:
          - name: public
            bind: 127.0.0.1:8080
          - name: public
            bind: 127.0.0.1:8081
        routes:
          - pool: echo
        pools:
          echo:
            backends:
              - address: 127.0.0.1:9001
        """
    assert str(error_in(text)) == (
        't.yaml:4:11: listeners[1].name: duplicate listener name "public" (first at line 2)'
    )


def test_unknown_balance_lists_the_allowed_values() -> None:
    text = MINIMAL.replace("  echo:\n", "  echo:\n    balance: least_connections\n")
    assert str(error_in(text)) == (
        't.yaml:8:14: pools.echo.balance: unknown balance algorithm "least_connections" '
        "(expected one of: round_robin, least_conn, random_two, hash)"
    )


def test_duplicate_key() -> None:
    text = MINIMAL + "timeouts:\n  idle: 5m\n  connect: 1s\n  idle: 10m\n"
    assert str(error_in(text)) == 't.yaml:13:3: timeouts: duplicate key "idle" (first at line 11)'


def test_missing_required_key_is_reported_at_the_mapping() -> None:
    text = MINIMAL.replace("    bind: 127.0.0.1:8080\n", "")
    assert str(error_in(text)) == 't.yaml:2:5: listeners[0]: missing required key "bind"'


def test_yaml_syntax_error() -> None:
    assert str(error_in("listeners:\n  - name: a\n bind: x\n")) == (
        "t.yaml:3:2: invalid YAML: expected <block end>, but found '<block mapping start>' "
        "(while parsing a block mapping at line 1, column 1)"
    )


def test_unquoted_wildcard_host_gets_a_hint() -> None:
    error = error_in(MINIMAL.replace("  - pool: echo", "  - host: *.example.com\n    pool: echo"))
    assert (error.line, error.column) == (5, 12)
    assert error.message.endswith('must be quoted, like "*.example.com"')


def test_empty_file() -> None:
    assert str(error_in("# nothing but a comment\n")) == (
        "t.yaml:1:1: the file is empty: expected a mapping with listeners, routes and pools"
    )


# --- every kind of error, by position and path ---------------------------------
#
# Each case changes one thing in MINIMAL. The helpers keep the line numbers
# predictable: a listener item is on line 2, a route on line 5, a backend on
# line 9, and a section appended to MINIMAL starts on line 10.

ROUTES_AND_POOLS = MINIMAL[MINIMAL.index("routes:") :]


def with_listeners(items: str) -> str:
    return "listeners:\n" + items + ROUTES_AND_POOLS


def with_route(route: str) -> str:
    return MINIMAL.replace("  - pool: echo\n", route)


def with_backends(items: str) -> str:
    return MINIMAL.replace("      - address: 127.0.0.1:9001\n", items)


def with_pool_line(line: str) -> str:
    return MINIMAL.replace("  echo:\n", "  echo:\n" + line)


NAME_RULE = "of 1..255 characters A-Z a-z 0-9 _ . -"
HOST_RULE = 'expected a host name, "*" or "*." and a host name'
DURATION = 'expected a duration like "250ms", "10s", "5m", "1h"'
SIZE = 'expected a size like 65536, "64KiB", "16MiB", "1GiB"'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # the file as a whole
        ("- listeners\n", "1:1: expected a mapping with listeners, routes and pools, got a list"),
        ("text\n", '1:1: expected a mapping with listeners, routes and pools, got "text"'),
        (ROUTES_AND_POOLS, '1:1: missing required key "listeners"'),
        (
            MINIMAL + "listener: []\n",
            '10:1: unknown key "listener" '
            "(expected one of: listeners, routes, pools, timeouts, limits, trusted_proxies, shutdown, admin, log, workers, upgrade)",
        ),
        (MINIMAL + "pools: {}\n", '10:1: duplicate key "pools" (first at line 6)'),
        ("a: b: c\n", "1:5: invalid YAML: mapping values are not allowed here"),
        ("{}\n---\n{}\n", "2:1: invalid YAML: a config file holds one document, found a second"),
        ("a: \x00\n", "1:4: invalid YAML: character 0x0000 is not allowed"),
        # listeners
        (
            "listeners: []\n" + ROUTES_AND_POOLS,
            "1:12: listeners: at least one listener is required",
        ),
        (
            with_listeners("  public: 127.0.0.1:80\n"),
            "2:3: listeners: expected a list of listeners, got a mapping",
        ),
        (
            with_listeners("  - 127.0.0.1:80\n"),
            '2:5: listeners[0]: expected a listener (name, bind, tls, proxy_protocol), got "127.0.0.1:80"',
        ),
        (
            with_listeners("  - {name: pub lic, bind: '0.0.0.0:80'}\n"),
            f'2:12: listeners[0].name: expected a listener name {NAME_RULE}, got "pub lic"',
        ),
        (
            with_listeners("  - {name: '', bind: '0.0.0.0:80'}\n"),
            f'2:12: listeners[0].name: expected a listener name {NAME_RULE}, got ""',
        ),
        (
            with_listeners("  - {name: [a], bind: '0.0.0.0:80'}\n"),
            "2:12: listeners[0].name: expected a listener name, got a list",
        ),
        (
            with_listeners("  - {name: a}\n"),
            '2:5: listeners[0]: missing required key "bind"',
        ),
        (
            with_listeners("  - {name: a, bind: '0.0.0.0:80', name: b}\n"),
            '2:35: listeners[0]: duplicate key "name" (first at line 2)',
        ),
        (
            with_listeners("  - {name: a, bind: ':80'}\n"),
            '2:21: listeners[0].bind: missing host in ":80" '
            '(to listen on every address, write "0.0.0.0:80" or "[::]:80")',
        ),
        (
            with_listeners("  - {name: a, bind: '::1:80'}\n"),
            '2:21: listeners[0].bind: an IPv6 address needs brackets, like "[::1]:9000", '
            'got "::1:80"',
        ),
        (
            with_listeners("  - {name: a, bind: 0.0.0.0:80}\n  - {name: b, bind: 0.0.0.0:80}\n"),
            '3:21: listeners[1].bind: duplicate listener bind "0.0.0.0:80" (first at line 2)',
        ),
        # routes
        (
            MINIMAL.replace("routes:\n  - pool: echo\n", "routes: []\n"),
            "4:9: routes: at least one route is required",
        ),
        (with_route("  - {}\n"), '5:5: routes[0]: missing required key "pool"'),
        (with_route("  - {pool: ~}\n"), "5:12: routes[0].pool: expected a pool name, got null"),
        (
            with_route("  - {pool: echo, path: chat}\n"),
            '5:24: routes[0].path: expected a path starting with "/", got "chat"',
        ),
        (
            with_route("  - {pool: echo, path: '/chat?x'}\n"),
            '5:24: routes[0].path: a route path cannot contain "?", "#" or whitespace, '
            'got "/chat?x"',
        ),
        (
            with_route("  - {pool: echo, path: /%61dmin}\n"),
            '5:24: routes[0].path: a route path is matched in normal form: write "/admin", not "/%61dmin"',
        ),
        (
            with_route("  - {pool: echo, path: //a/./b}\n"),
            '5:24: routes[0].path: a route path is matched in normal form: write "/a/b", not "//a/./b"',
        ),
        (
            with_route("  - {pool: echo, path: /a%2fb}\n"),
            '5:24: routes[0].path: a route path with an encoded "/" (%2F), got "/a%2fb"',
        ),
        (
            with_route("  - {pool: echo, path_ignore_case: yes please}\n"),
            '5:36: routes[0].path_ignore_case: expected true or false, got "yes please"',
        ),
        (
            with_route("  - {pool: echo, strip_headers: X-Debug}\n"),
            '5:33: routes[0].strip_headers: expected a list of header names, got "X-Debug"',
        ),
        (
            with_route("  - {pool: echo, strip_headers: [X-Debug, 'X Y']}\n"),
            '5:43: routes[0].strip_headers[1]: expected a header name, got "X Y"',
        ),
        (
            with_route("  - {pool: echo, strip_headers: [Sec-WebSocket-Key]}\n"),
            "5:34: routes[0].strip_headers[0]: Sec-WebSocket-Key cannot be stripped: the WebSocket handshake needs it",
        ),
        (
            with_route("  - {pool: echo, strip_headers: [X_Forwarded_For]}\n"),
            "5:34: routes[0].strip_headers[0]: X_Forwarded_For is always replaced by the proxy "
            "(or appended to, for trusted_proxies)",
        ),
        (
            with_route("  - {pool: echo, host: 'exa mple.com'}\n"),
            f'5:24: routes[0].host: {HOST_RULE}, got "exa mple.com"',
        ),
        (
            with_route("  - {pool: echo, host: '*example.com'}\n"),
            f'5:24: routes[0].host: {HOST_RULE}, got "*example.com"',
        ),
        (
            with_route("  - {pool: echo, host: 10.0.0.1}\n"),
            f'5:24: routes[0].host: {HOST_RULE}, got "10.0.0.1"',
        ),
        # pools
        (
            MINIMAL.replace("pools:\n", "pools:\n  other: fast\n"),
            '7:10: pools.other: expected a pool (balance, backends, ...), got "fast"',
        ),
        (
            MINIMAL.replace("pool: echo", "pool: e cho").replace("  echo:", "  e cho:"),
            f'7:3: pools.e cho: expected a pool name {NAME_RULE}, got "e cho"',
        ),
        (
            with_pool_line("    balance: [round_robin]\n"),
            "8:14: pools.echo.balance: expected one of: round_robin, least_conn, random_two, hash, got a list",
        ),
        (
            with_pool_line("    backends: [{address: '127.0.0.1:1'}]\n"),
            '9:5: pools.echo: duplicate key "backends" (first at line 8)',
        ),
        (
            MINIMAL + "  echo: {backends: [{address: '127.0.0.1:1'}]}\n",
            '10:3: pools: duplicate key "echo" (first at line 7)',
        ),
        (
            with_backends("      []\n"),
            "9:7: pools.echo.backends: a pool needs at least one backend",
        ),
        (
            with_backends("      127.0.0.1:9001\n"),
            '9:7: pools.echo.backends: expected a list of backends, got "127.0.0.1:9001"',
        ),
        # backends
        (
            with_backends("      - {weight: 2}\n"),
            '9:9: pools.echo.backends[0]: missing required key "address"',
        ),
        (
            with_backends("      - {address: 127.0.0.1:9001}\n      - {address: 127.0.0.1:9001}\n"),
            "10:19: pools.echo.backends[1].address: "
            'duplicate backend address "127.0.0.1:9001" (first at line 9)',
        ),
        (
            with_backends("      - {address: {host: a, port: 1}}\n"),
            '9:19: pools.echo.backends[0].address: expected "host:port", got a mapping',
        ),
        (
            with_backends("      - {address: 127.0.0.1:0}\n"),
            "9:19: pools.echo.backends[0].address: "
            "port must be in 1..65535, got 0 (port 0 is only allowed for listener binds)",
        ),
        (
            with_backends("      - {address: 127.0.0.1:65536}\n"),
            "9:19: pools.echo.backends[0].address: port must be in 1..65535, got 65536",
        ),
        (
            with_backends("      - {address: 127.0.0.1:9001, weight: 0}\n"),
            "9:43: pools.echo.backends[0].weight: expected an integer in 1..1000, got 0",
        ),
        (
            with_backends("      - {address: 127.0.0.1:9001, weight: 1001}\n"),
            "9:43: pools.echo.backends[0].weight: expected an integer in 1..1000, got 1001",
        ),
        (
            with_backends("      - {address: 127.0.0.1:9001, weight: yes}\n"),
            "9:43: pools.echo.backends[0].weight: expected an integer in 1..1000, got yes",
        ),
        (
            with_backends("      - {address: 127.0.0.1:9001, weight: '2'}\n"),
            '9:43: pools.echo.backends[0].weight: expected an integer in 1..1000, got "2"',
        ),
        (
            with_backends("      - {address: 127.0.0.1:9001, weight: 1.5}\n"),
            "9:43: pools.echo.backends[0].weight: expected an integer in 1..1000, got 1.5",
        ),
        # timeouts
        (MINIMAL + "timeouts: 10s\n", '10:11: timeouts: expected a mapping, got "10s"'),
        (
            MINIMAL + "timeouts:\n  idle_s: 10s\n",
            '11:3: timeouts: unknown key "idle_s" '
            "(expected one of: handshake, connect, upstream_handshake, idle, reload)",
        ),
        (
            MINIMAL + "timeouts:\n  idle: 600\n",
            '11:9: timeouts.idle: a duration needs a unit (ms, s, m, h or d), got "600"',
        ),
        (
            MINIMAL + "timeouts:\n  connect: 0s\n",
            '11:12: timeouts.connect: must be greater than 0, got "0s"',
        ),
        (
            MINIMAL + "timeouts:\n  handshake: -1s\n",
            f'11:14: timeouts.handshake: {DURATION}, got "-1s"',
        ),
        (
            MINIMAL + "timeouts:\n  upstream_handshake: [1s]\n",
            f"11:23: timeouts.upstream_handshake: {DURATION}, got a list",
        ),
        # log
        (MINIMAL + "log:\n  sessions: some\n", '11:13: log.sessions: unknown log sessions "some" (expected one of: both, close, none)'),
        # limits
        (
            MINIMAL + "limits:\n  max_header_bytes: 1023\n",
            "11:21: limits.max_header_bytes: must be at least 1024 bytes, got 1023",
        ),
        (
            MINIMAL + "limits:\n  max_header_bytes: 1KiB\n  max_message_bytes: -1\n",
            "12:22: limits.max_message_bytes: must be at least 0 bytes, got -1",
        ),
        (
            MINIMAL + "limits:\n  max_message_bytes: 16MB\n",
            f'11:22: limits.max_message_bytes: {SIZE}, got "16MB" '
            "(units are binary: KiB, MiB, GiB)",
        ),
        (
            MINIMAL + "limits:\n  max_message_bytes: true\n",
            f"11:22: limits.max_message_bytes: {SIZE}, got true",
        ),
        (
            MINIMAL + "limits:\n  max_sessions_per_identity: -1\n",
            "11:30: limits.max_sessions_per_identity: expected an integer in 0..10000000, got -1",
        ),
        (
            MINIMAL + "limits:\n  on_identity_limit: kick\n",
            '11:22: limits.on_identity_limit: unknown on_identity_limit "kick" (expected one of: refuse, close_oldest)',
        ),
    ],
)
def test_error(text: str, expected: str) -> None:
    assert str(error_in(text)) == f"t.yaml:{expected}"


def test_all_errors_are_reported_in_one_run_sorted_by_position() -> None:
    text = """\
        listeners:
          - name: public
            bind: 127.0.0.1:99999
        routes:
          - pool: chat
        pools:
          echo:
            balance: random
            backends:
              - address: chat-3
        timeouts:
          idle: forever
        limits:
          max_header_bytes: 100
          max_frame_bytes: 1MiB
        """
    assert [str(error) for error in errors_in(text)] == [
        "t.yaml:3:11: listeners[0].bind: port must be in 0..65535, got 99999",
        't.yaml:5:11: routes[0].pool: route names pool "chat", which is not defined',
        't.yaml:8:14: pools.echo.balance: '
        'unknown balance algorithm "random" (expected one of: round_robin, least_conn, random_two, hash)',
        't.yaml:10:18: pools.echo.backends[0].address: expected "host:port", got "chat-3"',
        f't.yaml:12:9: timeouts.idle: {DURATION}, got "forever"',
        "t.yaml:14:21: limits.max_header_bytes: must be at least 1024 bytes, got 100",
        't.yaml:15:3: limits: unknown key "max_frame_bytes" '
        "(expected one of: max_header_bytes, max_message_bytes, max_connections, max_connections_per_ip, handshake_rate_per_ip, max_message_rate, "
        "max_sessions_per_identity, on_identity_limit)",
    ]


def test_a_broken_pools_section_does_not_make_every_route_dangle() -> None:
    text = MINIMAL[: MINIMAL.index("pools:")] + "pools: [echo]\n"
    assert str(error_in(text)) == (
        "t.yaml:6:8: pools: expected a mapping of pool names to pools, got a list"
    )


def test_a_pool_with_errors_is_still_defined_for_routes() -> None:
    error = error_in(MINIMAL.replace("127.0.0.1:9001", "127.0.0.1"))
    assert error.path == "pools.echo.backends[0].address"


def test_a_mapping_that_merges_itself_is_reported_not_looped() -> None:
    assert str(error_in(MINIMAL + "timeouts: &t {<<: *t}\n")) == (
        "t.yaml:10:11: timeouts: a mapping cannot merge itself"
    )


def test_every_prefix_of_a_config_loads_or_fails_with_config_errors() -> None:
    # Like h11's fuzzing: a truncated file must never raise anything but ConfigErrors.
    text = MINIMAL + "timeouts: {idle: 1m30s}\nlimits:\n  max_header_bytes: 16KiB\n"
    for end in range(len(text) + 1):
        try:
            parse_config(text[:end], "t.yaml")
        except ConfigErrors as exc:
            assert all(error.file == "t.yaml" and error.message for error in exc.errors)


# --- load_config ---------------------------------------------------------------


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "wsproxy.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_config(str(path)) == parse_config(MINIMAL, str(path))


def test_load_config_reports_a_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "missing.yaml")
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: [Errno 2] No such file or directory"
    assert (info.value.errors[0].line, info.value.errors[0].column) == (0, 0)


def test_load_config_reports_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))
    offset = len(MINIMAL) + len("# caf")
    assert str(info.value) == f"{path}: cannot read: not UTF-8 (byte 0xe9 at offset {offset})"


def test_load_config_names_the_file_in_each_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "timeouts: {idle: 10}\n", encoding="utf-8")
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))
    assert str(info.value) == (
        f'{path}:10:18: timeouts.idle: a duration needs a unit (ms, s, m, h or d), got "10"'
    )


ORDER = "units in a duration go from the largest to the smallest, each once"
BRACKETS = 'an IPv6 address needs brackets, like "[::1]:9000"'
ONLY_LISTENERS = "port 0 is only allowed for listener binds"
LONG = "a" * 64

# --- the value parsers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1ms", 0.001),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("0.1s", 0.1),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1m30s", 90.0),
        ("1h1m1s500ms", 3661.5),
        ("2d12h", 216000.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("10", 'a duration needs a unit (ms, s, m, h or d), got "10"'),
        ("1.5", 'a duration needs a unit (ms, s, m, h or d), got "1.5"'),
        ("10 seconds", 'expected a duration like "250ms", "10s", "5m", "1h", got "10 seconds"'),
        ("10 s", 'expected a duration like "250ms", "10s", "5m", "1h", got "10 s"'),
        ("", 'expected a duration like "250ms", "10s", "5m", "1h", got ""'),
        ("s", 'expected a duration like "250ms", "10s", "5m", "1h", got "s"'),
        ("-1s", 'expected a duration like "250ms", "10s", "5m", "1h", got "-1s"'),
        (".5s", 'expected a duration like "250ms", "10s", "5m", "1h", got ".5s"'),
        ("1.s", 'expected a duration like "250ms", "10s", "5m", "1h", got "1.s"'),
        ("1S", 'expected a duration like "250ms", "10s", "5m", "1h", got "1S"'),
        ("1w", 'expected a duration like "250ms", "10s", "5m", "1h", got "1w"'),
        ("30s1m", f'{ORDER}, got "30s1m"'),
        ("1m1m", f'{ORDER}, got "1m1m"'),
    ],
)
def test_parse_duration_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "allow_port_zero", "address"),
    [
        ("127.0.0.1:8080", False, Address("127.0.0.1", 8080)),
        ("0.0.0.0:0", True, Address("0.0.0.0", 0)),
        ("[::1]:9000", False, Address("::1", 9000)),
        ("[::]:0", True, Address("::", 0)),
        ("[2001:DB8:0::1]:443", False, Address("2001:db8::1", 443)),
        ("backend.internal:9000", False, Address("backend.internal", 9000)),
        ("Backend-2.Internal:65535", False, Address("backend-2.internal", 65535)),
        ("localhost:1", False, Address("localhost", 1)),
        ("chat-3:9000", False, Address("chat-3", 9000)),
    ],
)
def test_parse_address(text: str, allow_port_zero: bool, address: Address) -> None:
    assert parse_address(text, allow_port_zero=allow_port_zero) == address


def test_address_str_round_trips() -> None:
    for text in ["127.0.0.1:8080", "[::1]:9000", "backend.internal:9000"]:
        assert str(parse_address(text, allow_port_zero=False)) == text


@pytest.mark.parametrize(
    ("text", "allow_port_zero", "message"),
    [
        ("chat-3", False, 'expected "host:port", got "chat-3"'),
        ("", False, 'expected "host:port", got ""'),
        ("::1", False, f'{BRACKETS}, got "::1"'),
        ("2001:db8::1:80", False, f'{BRACKETS}, got "2001:db8::1:80"'),
        ("[::1]", False, 'expected "[host]:port", got "[::1]"'),
        ("[::1:80", False, 'expected "[host]:port", got "[::1:80"'),
        ("[10.0.0.1]:80", False, 'invalid IPv6 address "10.0.0.1" in "[10.0.0.1]:80"'),
        ("[zz::1]:80", False, 'invalid IPv6 address "zz::1" in "[zz::1]:80"'),
        (
            ":80",
            True,
            'missing host in ":80" (to listen on every address, write "0.0.0.0:80" or "[::]:80")',
        ),
        ("host:", False, 'invalid port "" in "host:"'),
        ("host:http", False, 'invalid port "http" in "host:http"'),
        ("host:+80", False, 'invalid port "+80" in "host:+80"'),
        ("host:0", False, f"port must be in 1..65535, got 0 ({ONLY_LISTENERS})"),
        ("host:65536", False, "port must be in 1..65535, got 65536"),
        ("host:65536", True, "port must be in 0..65535, got 65536"),
        ("256.0.0.1:80", False, 'invalid IPv4 address "256.0.0.1" in "256.0.0.1:80"'),
        ("10.0.0:80", False, 'invalid IPv4 address "10.0.0" in "10.0.0:80"'),
        ("bad_host:80", False, 'invalid host "bad_host" in "bad_host:80"'),
        ("-bad.example:80", False, 'invalid host "-bad.example" in "-bad.example:80"'),
        ("bad..example:80", False, 'invalid host "bad..example" in "bad..example:80"'),
        ("example.123:80", False, 'invalid host "example.123" in "example.123:80"'),
        (f"{LONG}.lan:80", False, f'invalid host "{LONG}.lan" in "{LONG}.lan:80"'),
    ],
)
def test_parse_address_refuses(text: str, allow_port_zero: bool, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text, allow_port_zero=allow_port_zero)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("65536", 65536),
        ("512B", 512),
        ("64KiB", 65536),
        ("16MiB", 16 * 1024 * 1024),
        ("1GiB", 1024**3),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("64KB", " (units are binary: KiB, MiB, GiB)"),
        ("16m", " (units are binary: KiB, MiB, GiB)"),
        ("64 KiB", ""),
        ("1.5MiB", ""),
        ("-1", ""),
        ("1TiB", ""),
        ("lots", ""),
    ],
)
def test_parse_size_refuses(text: str, hint: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == f'{SIZE}, got "{text}"{hint}'


def test_sizes_in_yaml_accept_integers_and_strings() -> None:
    limits = "limits: {max_header_bytes: 8KiB, max_message_bytes: 1_048_576}\n"
    config = parse_config(MINIMAL + limits, "t.yaml")
    assert config.limits == LimitsConfig(max_header_bytes=8192, max_message_bytes=1024 * 1024)


def test_route_header_and_case_keys() -> None:
    config = parse_config(
        with_route(
            "  - {pool: echo, path: /admin, path_ignore_case: true, strip_headers: [X-Debug, X_Trace],"
            " strip_headers_default: false}\n  - pool: echo\n"
        ),
        "t.yaml",
    )
    first, second = config.routes
    assert (first.path_ignore_case, first.strip_headers, first.strip_headers_default) == (True, ("X-Debug", "X_Trace"), False)
    assert (second.path_ignore_case, second.strip_headers, second.strip_headers_default) == (False, (), True)


def test_route_subprotocol_keys() -> None:
    config = parse_config(
        with_route(
            "  - {pool: echo, path: /graphql, subprotocol: graphql-transport-ws,"
            " subprotocols: [graphql-transport-ws], subprotocol_required: true}\n"
            "  - {pool: echo, subprotocols: [chat.v2, chat.v1], client_cert_header: X-Forwarded-Client-Cert}\n"
        ),
        "t.yaml",
    )
    first, second = config.routes
    assert (first.subprotocol, first.subprotocols, first.subprotocol_required) == (
        "graphql-transport-ws", ("graphql-transport-ws",), True
    )
    assert (second.subprotocol, second.subprotocols, second.subprotocol_required) == (None, ("chat.v2", "chat.v1"), False)
    assert (first.client_cert_header, second.client_cert_header) == (None, "X-Forwarded-Client-Cert")
    assert RouteConfig(pool=ECHO).subprotocols is None  # absent: any offer passes


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("{pool: echo, subprotocol: 'a b'}", "t.yaml:5:31: routes[0].subprotocol: a subprotocol name is a token"),
        ("{pool: echo, subprotocols: [ok, 'x,y']}", "t.yaml:5:37: routes[0].subprotocols[1]: a subprotocol name is a token"),
        ("{pool: echo, subprotocols: chat}", "t.yaml:5:32: routes[0].subprotocols: expected a list of subprotocol names"),
        ("{pool: echo, subprotocol_required: yes please}", "t.yaml:5:40: routes[0].subprotocol_required: expected true or false"),
        (
            "{pool: echo, subprotocols: [chat.v2], subprotocol: chat.v1}",
            't.yaml:5:56: routes[0].subprotocol: the route matches on subprotocol "chat.v1", which its subprotocols list does not allow',
        ),
        ("{pool: echo, client_cert_header: 'X Cert'}", 't.yaml:5:38: routes[0].client_cert_header: expected a header name, got "X Cert"'),
        ("{pool: echo, client_cert_header: Sec-WebSocket-Key}", "t.yaml:5:38: routes[0].client_cert_header: Sec-WebSocket-Key is a header the proxy or the handshake owns"),
    ],
)
def test_route_subprotocol_errors(route: str, message: str) -> None:
    text = MINIMAL.replace("  - pool: echo\n", f"  - {route}\n")
    assert str(error_in(text)).startswith(message)


def test_gate_identity_keys_are_checked_at_their_position() -> None:
    text = dedent("""\
        listeners:
          - name: public
            bind: 127.0.0.1:8443
            tls: {cert: missing.pem, key: missing.key, client_identity: san_ip}
          - name: other
            bind: 127.0.0.1:8444
            tls: {cert: missing.pem, key: missing.key, client_identity: san_uri}
        routes:
          - pool: echo
            auth: {forward: {url: "http://127.0.0.1:9100/auth", identity_from: "X User"}}
        pools:
          echo:
            backends:
              - address: 127.0.0.1:9001
        """)
    shown = [str(e) for e in errors_in(text)]
    assert (
        't.yaml:4:65: listeners[0].tls.client_identity: unknown client_identity "san_ip"'
        " (expected one of: subject_cn, san_uri, san_dns, san_email)"
    ) in shown, shown
    assert (
        "t.yaml:7:65: listeners[1].tls.client_identity: client_identity needs client_ca"
        " (without client certificates there is no identity)"
    ) in shown, shown
    assert "t.yaml:10:72: routes[0].auth.forward.identity_from: identity_from: 'X User' is not a header name" in shown, shown


def test_gate_identity_keys_load() -> None:
    config = parse_config(
        with_route('  - {pool: echo, auth: {forward: {url: "http://127.0.0.1:9100/auth", identity_from: X-User}}}\n'),
        "t.yaml",
    )
    (route,) = config.routes
    assert route.auth is not None and route.auth.forward is not None
    assert route.auth.forward.identity_from == "X-User"
def test_identity_caps_are_read() -> None:
    config = parse_config(MINIMAL + "limits:\n  max_sessions_per_identity: 5\n  on_identity_limit: close_oldest\n", "t.yaml")
    assert (config.limits.max_sessions_per_identity, config.limits.on_identity_limit) == (5, "close_oldest")
    default = parse_config(MINIMAL, "t.yaml").limits
    assert (default.max_sessions_per_identity, default.on_identity_limit) == (0, "refuse")
