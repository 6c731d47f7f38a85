"""A loaded config is data: frozen dataclasses of plain values, no SSL context or other live object.

The config is loaded with every TLS and forward-auth setting, then checked the
way every entry point loads it (``load_checked``: the SSL contexts are built,
by the edge, outside the config), and walked field by field. Allowed: str,
int, float, bool, bytes, None, enums, ipaddress values, tuples and
frozensets of those, the ``pools`` mapping, and frozen dataclasses of those.

Not covered: ``routes[].auth.jwt`` (``JwtConfig.key_material`` still holds the
keys parsed at load time and, with ``jwks_url``, the source the edge refreshes).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from pathlib import Path

import trustme

from tests.kit.tls import make_pki, q, write_leaf
from wsproxy.config.schema import Config, PoolName
from wsproxy.edge.contexts import load_checked

PLAIN: tuple[type, ...] = (str, int, float, bool, bytes, type(None), enum.Enum)
PLAIN += (ipaddress.IPv4Network, ipaddress.IPv6Network, ipaddress.IPv4Address, ipaddress.IPv6Address)


def live_objects(value: object, path: str = "config") -> list[str]:
    """``path: type`` of everything under ``value`` that is not plain data."""
    if isinstance(value, PLAIN):
        return []
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if not type(value).__dataclass_params__.frozen:  # type: ignore[attr-defined]
            return [f"{path}: {type(value).__name__} is not frozen"]
        return [found for f in dataclasses.fields(value) for found in live_objects(getattr(value, f.name), f"{path}.{f.name}")]
    if isinstance(value, (tuple, frozenset)):
        return [found for index, item in enumerate(value) for found in live_objects(item, f"{path}[{index}]")]
    if isinstance(value, dict) and path == "config.pools":  # the one mapping of the schema, by pool name
        return [found for key, item in value.items() for found in [*live_objects(key, path), *live_objects(item, f"{path}.{key}")]]
    return [f"{path}: {type(value).__module__}.{type(value).__qualname__}"]


def everything_tls_and_forward_auth(tmp_path: Path) -> Path:
    server, backend, clients = make_pki(tmp_path, "server"), make_pki(tmp_path, "backend"), trustme.CA()
    clients_ca = tmp_path / "clients-ca.pem"
    clients.cert_pem.write_to_path(str(clients_ca))
    sni_cert, sni_key = write_leaf(server.ca.issue_cert("chat.example.com"), tmp_path, "sni")
    client_cert, client_key = write_leaf(backend.ca.issue_cert("proxy"), tmp_path, "to-backend")
    path = tmp_path / "wsproxy.yaml"
    path.write_text(
        f"""\
listeners:
  - name: public
    bind: 127.0.0.1:0
    proxy_protocol: v2
    tls:
      cert: {q(server.cert_pem)}
      key: {q(server.key_pem)}
      sni:
        - names: ["chat.example.com", "*.chat.example.com"]
          cert: {q(sni_cert)}
          key: {q(sni_key)}
      client_ca: {q(clients_ca)}
      client_cert: optional
      client_identity: san_dns
      session_ticket_lifetime: 30m
trusted_proxies: ["10.0.0.0/8", "::1"]
routes:
  - path: /chat
    pool: secure
    client_cert_header: X-Client-Cert
    auth:
      sources: [header, "cookie:session"]
      forward:
        url: http://127.0.0.1:9100/auth?scope=ws
        send_headers: [Cookie, Authorization]
        copy_headers: [X-User]
        timeout: 2s
        cache: 30s
        identity_from: X-User
        lifetime_from: X-Session-Lifetime
  - pool: system
pools:
  secure:
    backends:
      - address: 127.0.0.1:9001
    tls:
      ca: {q(backend.ca_pem)}
      server_name: localhost
      cert: {q(client_cert)}
      key: {q(client_key)}
  system:
    backends:
      - address: "wss://127.0.0.1:9002"
"""
    )
    return path


def test_a_config_with_every_tls_and_forward_auth_setting_holds_only_data(tmp_path: Path) -> None:
    config = load_checked(str(everything_tls_and_forward_auth(tmp_path)))
    assert isinstance(config, Config)
    tls, secure = config.listeners[0].tls, config.pools[PoolName("secure")]
    assert tls is not None and tls.sni and tls.client_ca and tls.where is not None  # the settings are there...
    assert secure.tls is not None and secure.tls.cert and config.routes[0].auth is not None
    assert config.routes[0].auth.forward is not None and config.pools[PoolName("system")].backends[0].tls
    assert live_objects(config) == []  # ...as plain data


def test_the_walk_finds_a_live_object() -> None:
    """The walk itself: an SSLContext where a value should be is reported with its path."""
    import ssl

    from tests.kit.servers import make_config

    config = make_config([9001])
    assert live_objects(config) == []
    pool = config.pools[next(iter(config.pools))]
    bad = dataclasses.replace(config, trusted_proxies=(ssl.create_default_context(),))  # type: ignore[arg-type]
    assert live_objects(bad) == ["config.trusted_proxies[0]: ssl.SSLContext"]
    assert live_objects(dataclasses.replace(config, pools={pool.name: [pool]})) == [f"config.pools.{pool.name}: builtins.list"]  # type: ignore[dict-item]
