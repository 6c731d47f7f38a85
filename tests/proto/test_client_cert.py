"""Which name of a verified client certificate is the identity. No I/O here (XFCC: tests/e2e/test_client_identity.py)."""

from __future__ import annotations

import pytest

from wsproxy.proto.client_cert import certificate_identity

CERT = {
    "subject": ((("organizationName", "Example"),), (("commonName", "alice"),), (("commonName", "second"),)),
    "subjectAltName": (
        ("email", "alice@example.org"),
        ("DNS", "alice.example"),
        ("URI", "spiffe://example.org/alice"),
        ("DNS", "other.example"),
        ("URI", "https://example.org/other"),
    ),
}


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("subject_cn", "alice"),  # the first CN
        ("san_uri", "spiffe://example.org/alice"),  # the first of each type
        ("san_dns", "alice.example"),
        ("san_email", "alice@example.org"),
    ],
)
def test_each_kind_reads_its_name(kind: str, expected: str) -> None:
    assert certificate_identity(CERT, kind) == expected


def test_a_missing_name_or_a_control_character_gives_no_identity() -> None:
    bare = {"subject": ((("organizationName", "Example"),),)}
    for kind in ("subject_cn", "san_uri", "san_dns", "san_email"):
        assert certificate_identity(bare, kind) is None
    forged = {"subject": ((("commonName", "alice\r\nX-Admin: 1"),),), "subjectAltName": (("DNS", ""),)}
    assert certificate_identity(forged, "subject_cn") is None
    assert certificate_identity(forged, "san_dns") is None
