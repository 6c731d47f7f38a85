"""``wsproxy schema``: a valid draft 2020-12 schema that agrees with the loader, key for key.

The agreement is checked against the running loader, not against the source
the schema was read from: a config holding every section is loaded with an
unknown key added in each mapping, and the loader's own "unknown key ...
(expected one of: ...)" message must list exactly the schema's keys there.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from wsproxy.config.json_schema import fields_calls
from wsproxy.config.load import parse_config
from wsproxy.errors import ConfigErrors

ROOT = Path(__file__).parents[2]
SHIPPED = [ROOT / "conf" / "wsproxy.yaml", ROOT / "wsproxy" / "demo" / "conf" / "demo.yaml",
           ROOT / "deploy" / "docker" / "wsproxy.yaml"]
UNKNOWN = "zz_not_a_key"

#: Every mapping the loader reads, present at least once (values need not pass: only key errors are read).
FULL: dict[str, Any] = {
    "include": [],
    "listeners": [
        {"name": "plain", "bind": "127.0.0.1:8080", "proxy_protocol": "off"},
        {"name": "secure", "bind": "127.0.0.1:8443",
         "tls": {"cert": "c.pem", "key": "k.pem", "client_ca": "ca.pem", "client_cert": "optional",
                 "sni": [{"names": ["a.example"], "cert": "a.pem", "key": "a.key"}]}},
    ],
    "routes": [
        {"host": "a.example", "path": "/t", "pool": "p", "origins": ["https://a.example"], "allow_missing_origin": True,
         "auth": {"tokens": [{"name": "t", "sha256": "0" * 64}], "tokens_file": "t.txt", "sources": ["header"],
                  "identity_header": "X-User"},
         "keepalive": {"interval": "30s", "timeout": "10s"}, "validate_utf8": True,
         "backend_failure_close_code": 1014, "path_ignore_case": False, "strip_headers": ["X-A"],
         "strip_headers_default": True},
        {"path": "/j", "pool": "p", "auth": {"jwt": {"algorithms": ["RS256"], "keys": ["k.pem"], "jwks_file": "j.json",
                                                    "secret_file": "s", "issuer": "i", "audience": "a", "leeway": "5s",
                                                    "identity_claim": "sub", "pass_claims": ["role"]}}},
        {"path": "/f", "pool": "p", "auth": {"forward": {"url": "http://127.0.0.1:9/auth", "send_headers": ["Cookie"],
                                                        "copy_headers": ["X-User"], "timeout": "2s", "cache": "30s"}}},
    ],
    "pools": {
        "p": {"balance": "hash", "hash_balance_factor": 125, "retries": 1, "slow_start": "10s",
              "sticky": {"key": "cookie:s", "on_unavailable": "repick",
                         "cookie": {"secret_file": "s.key", "max_age": "1h", "same_site": "Lax"}},
              "health": {"type": "http", "path": "/h", "interval": "5s", "timeout": "1s", "rise": 2, "fall": 3,
                         "expect_status": [200], "start_healthy": False},
              "passive": {"failures": 5, "window": "10s", "ejection": "30s", "max_ejected_percent": 50},
              "tls": {"ca": "ca.pem", "server_name": "b.example", "cert": "c.pem", "key": "k.pem"},
              "drain": {"timeout": "0s", "spread": "2s", "close_timeout": "5s", "on_unhealthy": True},
              "backends": [{"address": "127.0.0.1:9001", "weight": 2, "max_connections": 10}]},
        "d": {"discovery": {"dns": "_ws._tcp.chat.example", "type": "SRV", "interval": "5s",
                            "resolvers": ["127.0.0.1:5353"], "on_error": "keep"},
              "rebalance": {"max_skew": 1.25, "rate": "1%/min", "sticky": False}},
    },
    "timeouts": {"handshake": "10s", "connect": "2s", "upstream_handshake": "5s", "idle": "10m", "reload": "30s"},
    "limits": {"max_header_bytes": "16KiB", "max_message_bytes": "1MiB", "max_connections": 10,
               "max_connections_per_ip": 5, "handshake_rate_per_ip": {"rate": "20/s", "burst": 40},
               "max_message_rate": {"rate": "100/s", "burst": 200}},
    "trusted_proxies": ["10.0.0.0/8"],
    "shutdown": {"timeout": "30s", "spread": "10s"},
    "admin": {"bind": "127.0.0.1:9090", "token_file": "t", "insecure_no_token": False, "health_needs_token": False,
              "ready_pools": ["p"]},
    "log": {"format": "json", "level": "info", "sessions": "close"},
    "workers": 2,
    "upgrade": {"timeout": "1h"},
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """What the real command prints."""
    done = subprocess.run([sys.executable, "-m", "wsproxy", "schema"], capture_output=True, text=True, timeout=60,
                          check=True, cwd=ROOT)
    return json.loads(done.stdout)


def object_schema(node: dict[str, Any]) -> dict[str, Any]:
    for option in node.get("anyOf", []):
        if option.get("type") == "object":
            return option
    return node


def test_the_schema_is_draft_2020_12(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_shipped_configs_validate(schema: dict[str, Any], path: Path) -> None:
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(path.read_text())))
    assert [(list(e.absolute_path), e.message) for e in errors] == []


def test_the_kubernetes_config_validates(schema: dict[str, Any]) -> None:
    [config_map] = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "wsproxy.yaml").read_text())
                    if d and d["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["wsproxy.yaml"])
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(config)) == []


def test_the_schema_catches_what_the_loader_refuses(schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    bad = copy.deepcopy(FULL)
    bad["pools"]["p"]["health"]["type"] = "smoke-signal"
    bad["pools"]["p"]["backends"][0]["weight"] = 0
    bad["listeners"][0]["tsl"] = {}
    found = {(tuple(e.absolute_path), e.validator) for e in validator.iter_errors(bad)}
    # health may be null (an empty mapping), so the enum is reported through anyOf at the mapping
    assert (("pools", "p", "health"), "anyOf") in found or (("pools", "p", "health", "type"), "enum") in found
    assert (("pools", "p", "backends", 0, "weight"), "minimum") in found
    assert (("listeners", 0), "additionalProperties") in found
    assert list(validator.iter_errors(FULL)) == []


def test_every_key_table_of_the_loader_is_in_the_schema() -> None:
    every, used = fields_calls()
    assert every and every == used, f"r.fields calls the schema does not reach: {sorted(every - used)}"


def mappings(value: Any, node: dict[str, Any], path: tuple[Any, ...]) -> list[tuple[tuple[Any, ...], set[str]]]:
    """(path, schema keys) of every fixed-key mapping of ``value``, walking ``node`` beside it."""
    node = object_schema(node)
    found = []
    if isinstance(value, dict) and "properties" in node:
        found.append((path, set(node["properties"])))
        for key, child in value.items():
            found += mappings(child, node["properties"][key], (*path, key))
    elif isinstance(value, dict) and isinstance(node.get("additionalProperties"), dict):
        for key, child in value.items():
            found += mappings(child, node["additionalProperties"], (*path, key))
    elif isinstance(value, list) and "items" in node:
        for index, child in enumerate(value):
            found += mappings(child, node["items"], (*path, index))
    return found


def count_objects(node: Any) -> int:
    if isinstance(node, dict):
        return ("properties" in node) + sum(count_objects(v) for v in node.values())
    if isinstance(node, list):
        return sum(count_objects(v) for v in node)
    return 0


def loader_keys(path: tuple[Any, ...]) -> set[str]:
    """The keys the loader accepts at ``path``, read from its error for an unknown key there."""
    config = copy.deepcopy(FULL)
    del config["include"]  # compose's key, not the loader's: the loader never sees it
    target: Any = config
    for step in path:
        target = target[step]
    target[UNKNOWN] = 1
    with pytest.raises(ConfigErrors) as caught:
        parse_config(yaml.safe_dump(config), "full.yaml")
    for error in caught.value.errors:
        match = re.fullmatch(rf'unknown key "{UNKNOWN}" \(expected one of: (.*)\)', error.message)
        if match:
            return set(match[1].split(", "))
    raise AssertionError(f"no unknown-key error at {path}: {[str(e) for e in caught.value.errors]}")


def test_the_schema_and_the_loader_accept_the_same_keys(schema: dict[str, Any]) -> None:
    found = mappings(FULL, schema, ())
    # FULL reaches every mapping of the schema, so no table goes unchecked.
    assert len({str(node) for node in _object_nodes(schema)}) <= len({frozenset(keys) for _, keys in found})
    for path, keys in found:
        expected = keys - {"include"} if path == () else keys
        assert loader_keys(path) == expected, path


def _object_nodes(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        own = [node] if "properties" in node else []
        return own + [n for v in node.values() for n in _object_nodes(v)]
    if isinstance(node, list):
        return [n for v in node for n in _object_nodes(v)]
    return []


def test_a_value_with_a_word_beside_its_type_takes_both(schema: dict[str, Any]) -> None:
    """``workers: 2`` and ``workers: auto`` are both what the loader takes; ``workers: many`` is not."""
    validator = jsonschema.Draft202012Validator(schema)
    for workers, ok in ((2, True), ("auto", True), ("many", False), (0, False)):
        assert not list(validator.iter_errors({**FULL, "workers": workers})) is ok, workers
