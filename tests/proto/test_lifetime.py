"""Pure tests of ``proto.lifetime``: the jitter rules, the revoked list, the lifetime header."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsproxy.proto.lifetime import (
    End,
    age_deadline,
    expiry_deadline,
    lifetime_deadline,
    parse_lifetime,
    parse_revoked,
    revocation_keys,
    revoked_by,
)

NOW = 1_800_000_000.0


def test_expiry_jitter_is_ten_percent_of_a_short_token() -> None:
    claims = {"exp": NOW + 20, "iat": NOW - 10}  # lives 30 s: the window is 3 s
    assert expiry_deadline(claims, 0.0, NOW, 0.0).at == NOW + 20  # type: ignore[union-attr]
    assert expiry_deadline(claims, 0.0, NOW, 0.5).at == pytest.approx(NOW + 21.5)  # type: ignore[union-attr]
    assert expiry_deadline(claims, 5.0, NOW, 0.5).at == pytest.approx(NOW + 26.5)  # type: ignore[union-attr]


def test_expiry_jitter_is_at_most_a_minute() -> None:
    claims = {"exp": NOW + 3600, "iat": NOW - 3600 * 23}
    deadline = expiry_deadline(claims, 30.0, NOW, 0.999999)
    assert deadline is not None and deadline.end is End.TOKEN_EXPIRED
    assert deadline.at == pytest.approx(NOW + 3600 + 30 + 60, abs=1e-3)


def test_expiry_without_iat_counts_the_lifetime_from_the_upgrade() -> None:
    assert expiry_deadline({"exp": NOW + 10}, 0.0, NOW, 0.5).at == pytest.approx(NOW + 10.5)  # type: ignore[union-attr]
    assert expiry_deadline({"exp": NOW + 10, "iat": "yesterday"}, 0.0, NOW, 0.5).at == pytest.approx(NOW + 10.5)  # type: ignore[union-attr]
    assert expiry_deadline({"exp": NOW + 10, "iat": NOW + 20}, 0.0, NOW, 0.5).at == pytest.approx(NOW + 10.5)  # type: ignore[union-attr]


@pytest.mark.parametrize("exp", [None, "soon", True, float("inf"), float("nan")])
def test_expiry_needs_a_numeric_exp(exp: object) -> None:
    assert expiry_deadline({} if exp is None else {"exp": exp}, 0.0, NOW, 0.5) is None


@given(
    lifetime=st.floats(min_value=0.001, max_value=1e8),
    leeway=st.floats(min_value=0, max_value=600),
    u=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_expiry_never_before_exp_and_never_later_than_the_window(lifetime: float, leeway: float, u: float) -> None:
    exp = NOW + lifetime / 2
    deadline = expiry_deadline({"exp": exp, "iat": exp - lifetime}, leeway, NOW, u)
    assert deadline is not None
    assert exp + leeway <= deadline.at <= exp + leeway + min(60.0, lifetime * 0.1) + 1e-6


@given(u=st.floats(min_value=0, max_value=1, exclude_max=True), age=st.floats(min_value=0.01, max_value=1e7))
def test_age_is_met_within_ten_percent(u: float, age: float) -> None:
    deadline = age_deadline(age, 100.0, u)
    assert deadline.end is End.LIFETIME
    assert 100 + 0.9 * age - 1e-6 <= deadline.at <= 100 + 1.1 * age + 1e-6


def test_forward_lifetime_uses_the_expiry_rule() -> None:
    deadline = lifetime_deadline(100.0, 50.0, 1.0)
    assert deadline.at == pytest.approx(160.0) and deadline.end is End.TOKEN_EXPIRED


def test_earlier_deadline_wins() -> None:
    age = age_deadline(10.0, 0.0, 0.5)
    token = lifetime_deadline(5.0, 0.0, 0.0)
    assert age.earlier(token) is token and token.earlier(age) is token and age.earlier(None) is age


def test_end_codes() -> None:
    assert (End.TOKEN_EXPIRED.client_code, End.TOKEN_EXPIRED.reason) == (1008, "token expired")
    assert (End.REVOKED.client_code, End.REVOKED.reason) == (1008, "token revoked")
    assert (End.LIFETIME.client_code, End.LIFETIME.reason) == (1012, "session lifetime reached")


def test_revoked_file() -> None:
    text = "# revoked after the incident\n\n  jti-1  \nalice # left the company\nbob#not-a-comment\n\t# indented comment\n"
    assert parse_revoked(text) == {"jti-1", "alice", "bob#not-a-comment"}
    assert parse_revoked("") == frozenset()


@pytest.mark.parametrize("text, line", [("a\ntwo words\n", 2), ("ok\nx\x07y\n", 2)])
def test_revoked_file_errors_name_the_line_not_the_entry(text: str, line: int) -> None:
    with pytest.raises(ValueError, match=f"^line {line}: ") as info:
        parse_revoked(text)
    assert "two" not in str(info.value) and "x" not in str(info.value).split(":", 1)[1].replace("expected", "")


def test_revocation_keys_and_matching() -> None:
    keys = revocation_keys("alice", {"jti": "t-1", "sub": "u-7", "exp": 1})
    assert keys == (("jti", "t-1"), ("subject", "u-7"), ("subject", "alice"))
    assert revoked_by({"t-1"}, keys) == "jti"
    assert revoked_by({"u-7"}, keys) == "subject"
    assert revoked_by({"alice"}, keys) == "subject"
    assert revoked_by({"bob"}, keys) is None
    assert revoked_by(frozenset(), keys) is None
    assert revocation_keys(None, {"jti": 42, "sub": True}) == (("jti", "42"),)  # booleans are not ids
    assert revocation_keys("name", None) == (("subject", "name"),)


@pytest.mark.parametrize("value, seconds", [(b"3600", 3600.0), (b" 0.5 ", 0.5), (b"0", 0.0)])
def test_lifetime_header(value: bytes, seconds: float) -> None:
    assert parse_lifetime(value) == seconds


@pytest.mark.parametrize("value", [b"", b"-1", b"1e3", b"1h", b"inf", b"nan", b"9999999999999", b"1.", b"\xff"])
def test_lifetime_header_refused(value: bytes) -> None:
    with pytest.raises(ValueError) as info:
        parse_lifetime(value)
    assert value.decode("latin-1").strip() not in str(info.value) or not value.strip()


# --- forward auth's lifetime header (edge.forward_auth.with_lifetime, its pure half) ----------------


def _answer(*headers: tuple[bytes, bytes], status: int = 200) -> object:
    import h11

    return h11.Response(status_code=status, headers=list(headers))


def test_forward_lifetime_header() -> None:
    from wsproxy.edge.forward_auth import Allowed, Denied, with_lifetime
    from wsproxy.proto.handshake import Rejection

    allowed = Allowed([(b"X-User", b"alice")])
    name = b"X-Session-Lifetime"
    verdict = with_lifetime(allowed, _answer((name, b"90")), name, 5.0, service="svc")  # type: ignore[arg-type]
    assert verdict == Allowed([(b"X-User", b"alice")], lifetime=(5.0, 90.0))
    assert with_lifetime(allowed, _answer((b"x-session-lifetime", b"1.5")), name, 5.0, service="svc") == Allowed(  # type: ignore[arg-type]
        allowed.headers, lifetime=(5.0, 1.5)
    )
    assert with_lifetime(allowed, _answer(), name, 5.0, service="svc") is allowed  # type: ignore[arg-type]
    assert with_lifetime(allowed, _answer((name, b"90")), None, 5.0, service="svc") is allowed  # type: ignore[arg-type]
    denied = Denied(401, [], b"", "no")
    assert with_lifetime(denied, _answer((name, b"90"), status=401), name, 5.0, service="svc") is denied  # type: ignore[arg-type]
    twice = with_lifetime(allowed, _answer((name, b"1"), (name, b"2")), name, 5.0, service="svc")  # type: ignore[arg-type]
    assert twice == Rejection(503, "auth service svc allowed with 2 X-Session-Lifetime headers")
    bad = with_lifetime(allowed, _answer((name, b"tomorrow")), name, 5.0, service="svc")  # type: ignore[arg-type]
    assert isinstance(bad, Rejection) and bad.status == 503 and "tomorrow" not in bad.reason
    assert bad.reason == "auth service svc allowed with a X-Session-Lifetime header that is not a number of seconds"
