"""``listeners[].tls.session_ticket_lifetime``: default, values, and errors at FILE:LINE:COL."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from wsproxy.config.load import load_config
from wsproxy.errors import ConfigErrors


def config(tmp_path: Path, lifetime: str | None) -> Path:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    extra = f"      session_ticket_lifetime: {lifetime}\n" if lifetime is not None else ""
    path = tmp_path / "t.yaml"
    path.write_text(
        "listeners:\n"
        "  - name: public\n"
        "    bind: 127.0.0.1:0\n"
        "    tls:\n"
        f"      cert: {cert}\n"
        f"      key: {key}\n"
        f"{extra}"
        "routes:\n"
        "  - pool: echo\n"
        "pools:\n"
        "  echo:\n"
        "    backends:\n"
        "      - address: 127.0.0.1:9001\n"
    )
    return path


@pytest.mark.parametrize(("text", "seconds"), [(None, 3600.0), ("30m", 1800.0), ("0", 0.0), ("7d", 604800.0)])
def test_session_ticket_lifetime_values(tmp_path: Path, text: str | None, seconds: float) -> None:
    tls = load_config(str(config(tmp_path, text))).listeners[0].tls
    assert tls is not None and tls.session_ticket_lifetime_s == seconds  # its context: tests/edge/test_contexts.py


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8d", "session_ticket_lifetime: at most 7d (RFC 8446 §4.6.1), got 691200s"),
        ("soon", 'expected a duration'),
        ("-1s", ""),
    ],
)
def test_session_ticket_lifetime_errors(tmp_path: Path, text: str, message: str) -> None:
    path = config(tmp_path, text)
    with pytest.raises(ConfigErrors) as info:
        load_config(str(path))
    (error,) = info.value.errors
    assert str(error).startswith(f"{path}:7:32: listeners[0].tls.session_ticket_lifetime: "), str(error)
    assert message in str(error)
