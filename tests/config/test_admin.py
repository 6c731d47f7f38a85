"""The admin section of the config: a listener off loopback needs a token or an explicit override."""

from __future__ import annotations

from pathlib import Path
from textwrap import dedent

import pytest

from wsproxy.config.load import parse_config
from wsproxy.config.schema import Address
from wsproxy.errors import ConfigErrors

#: Nine lines, so that the admin section starts on line 10.
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


def load(admin: str):  # type: ignore[no-untyped-def]
    return parse_config(MINIMAL + dedent(admin), "t.yaml").admin


@pytest.mark.parametrize("bind", ["0.0.0.0:9090", "'[::]:9090'", "10.0.0.5:9090", "admin.example.com:9090"])
def test_a_non_loopback_bind_without_a_token_is_a_located_error(bind: str) -> None:
    with pytest.raises(ConfigErrors) as info:
        load(f"admin:\n  bind: {bind}\n")
    [error] = info.value.errors
    assert (error.line, error.column, error.path) == (11, 9, "admin.bind")
    assert "is not a loopback address" in error.message and "insecure_no_token: true" in error.message
    assert str(error).startswith("t.yaml:11:9: admin.bind: ")


@pytest.mark.parametrize("bind", ["127.0.0.1:9090", "127.3.4.5:9090", "'[::1]:9090'", "localhost:9090", "unix:/run/wsproxy/a.sock"])
def test_loopback_and_unix_binds_need_no_token(bind: str) -> None:
    admin = load(f"admin:\n  bind: {bind}\n")
    assert admin is not None and admin.token is None and admin.insecure_no_token is False


def test_insecure_no_token_allows_it(tmp_path: Path) -> None:
    admin = load("admin:\n  bind: 0.0.0.0:9090\n  insecure_no_token: true\n")
    assert admin is not None and admin.bind == Address("0.0.0.0", 9090) and admin.insecure_no_token is True


def test_a_token_allows_it(tmp_path: Path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("0123456789abcdef0123\n")
    admin = load(f"admin:\n  bind: 0.0.0.0:9090\n  token_file: {token}\n")
    assert admin is not None and admin.token == b"0123456789abcdef0123"


def test_insecure_no_token_must_be_a_boolean() -> None:
    with pytest.raises(ConfigErrors) as info:
        load("admin:\n  bind: 127.0.0.1:9090\n  insecure_no_token: yes please\n")
    [error] = info.value.errors
    assert (error.line, error.path) == (12, "admin.insecure_no_token")
    assert error.message.startswith("expected true or false")
