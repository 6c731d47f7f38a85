"""The lifetime keys: routes[].max_session_age, auth.enforce_expiry, auth.revoked_file, forward.lifetime_from."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from wsproxy.config.load import load_config
from wsproxy.errors import ConfigErrors

HEAD = """\
listeners:
  - name: public
    bind: 127.0.0.1:8080
pools:
  chat:
    backends:
      - address: 127.0.0.1:9001
routes:
  - pool: chat
"""


def write(tmp_path: Path, route: str) -> Path:
    (tmp_path / "hs.key").write_bytes(b"k" * 32)
    path = tmp_path / "w.yaml"
    path.write_text(HEAD + textwrap.indent(textwrap.dedent(route), "    "))
    return path


def errors(tmp_path: Path, route: str) -> list[str]:
    path = write(tmp_path, route)
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))
    return [str(e).removeprefix(str(path) + ":") for e in info.value.errors]


JWT = "jwt: {algorithms: [HS256], secret_file: hs.key}"


def test_keys_load(tmp_path: Path) -> None:
    (tmp_path / "revoked").write_text("# incident 42\njti-1\nalice  # gone\n")
    route = f"max_session_age: 2h\nauth: {{{JWT}, enforce_expiry: true, revoked_file: revoked}}\n"
    config = load_config(str(write(tmp_path, route)))
    [loaded] = config.routes
    assert loaded.max_session_age_s == 7200.0
    assert loaded.auth is not None and loaded.auth.enforce_expiry
    assert loaded.auth.revoked == {"jti-1", "alice"} and loaded.auth.revoked_file == str(tmp_path / "revoked")
    forward = "auth: {forward: {url: \"http://127.0.0.1:9100/auth\", lifetime_from: X-Session-Lifetime}}\n"
    [loaded] = load_config(str(write(tmp_path, forward))).routes
    assert loaded.auth is not None and loaded.auth.forward is not None
    assert loaded.auth.forward.lifetime_from == "X-Session-Lifetime"


def test_defaults(tmp_path: Path) -> None:
    [loaded] = load_config(str(write(tmp_path, f"auth: {{{JWT}}}\n"))).routes
    assert loaded.max_session_age_s is None
    assert loaded.auth is not None and not loaded.auth.enforce_expiry and loaded.auth.revoked == frozenset()


@pytest.mark.parametrize(
    "route, expected",
    [
        ("max_session_age: 0s\n", '10:22: routes[0].max_session_age: must be greater than 0, got "0s"'),
        ("max_session_age: 2\n", '10:22: routes[0].max_session_age: a duration needs a unit (ms, s, m, h or d), got "2"'),
        (
            "auth: {tokens: [], enforce_expiry: true}\n",
            "10:40: routes[0].auth.enforce_expiry: enforce_expiry needs jwt auth (static tokens do not expire)",
        ),
        (
            "auth: {forward: {url: \"http://a:1/\"}, enforce_expiry: true}\n",
            "10:59: routes[0].auth.enforce_expiry: enforce_expiry needs jwt auth "
            "(forward auth bounds sessions with forward.lifetime_from)",
        ),
        (f"auth: {{{JWT}, enforce_expiry: yes please}}\n", None),
        (
            "auth: {forward: {url: \"http://a:1/\", lifetime_from: \"X Life\"}}\n",
            "10:21: routes[0].auth.forward: lifetime_from: 'X Life' is not a header name",
        ),
    ],
)
def test_errors(tmp_path: Path, route: str, expected: str | None) -> None:
    found = errors(tmp_path, route)
    if expected is None:
        assert len(found) == 1 and "routes[0].auth.enforce_expiry: expected true or false" in found[0]
    else:
        assert found == [expected]


def test_revoked_file_errors(tmp_path: Path) -> None:
    (tmp_path / "revoked").write_text("ok\nnot one entry\n")
    [found] = errors(tmp_path, f"auth: {{{JWT}, revoked_file: revoked}}\n")
    assert found.startswith("10:75: routes[0].auth.revoked_file: ")
    assert found.endswith("revoked: line 2: expected one token id or subject, got several words")
    [found] = errors(tmp_path, f"auth: {{{JWT}, revoked_file: missing}}\n")
    assert "routes[0].auth.revoked_file: cannot read" in found
