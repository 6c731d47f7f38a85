"""A verified client certificate as an identity and as Envoy's X-Forwarded-Client-Cert. No I/O here.

The TLS shell (``edge.session``) hands over what OpenSSL verified: the
decoded certificate of ``SSLObject.getpeercert()`` and its DER bytes
(``getpeercert(binary_form=True)``). This module decides

- the session's identity, per listener (``tls.client_identity``):
  ``subject_cn`` (the subject's common name; RFC 6125 §6.4.4 calls it a
  legacy place for a name, but it is where most private PKIs still put the
  user), ``san_uri`` (the first URI subjectAltName: SPIFFE IDs,
  ``spiffe://trust-domain/path``), ``san_dns`` (the first DNS one) or
  ``san_email`` (the first rfc822Name, RFC 5280 §4.2.1.6);
- the value of ``routes[].client_cert_header`` in Envoy's XFCC format::

      Hash=<hex SHA-256 of the DER>;Subject="CN=alice,O=Example";URI=spiffe://example.org/alice;DNS=a.example;DNS=b.example

  Keys in Envoy's order (Hash, Subject, URI, DNS; one URI and one DNS pair per
  name). The Subject is in RFC 4514 form (most specific RDN first, as Envoy
  prints it) and always double-quoted; another value is quoted when it holds a
  ``,`` ``;`` ``=`` ``"`` or whitespace (Envoy: such a value "must be
  double-quoted"). Inside quotes ``"`` and ``\\`` are escaped with a
  backslash. A value with a control character (which a header cannot carry
  safely) is left out, key and all.

What it is not: certificate verification (OpenSSL's, in ``edge.tls``), and
the ``By``, ``Cert`` and ``Chain`` keys, which wsproxy does not send (``By``
names the proxy's own certificate, ``Cert``/``Chain`` would put a whole PEM
in every upgrade request).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

__all__ = ["certificate_identity", "xfcc_element"]

#: ``listeners[].tls.client_identity`` values (``schema.CLIENT_IDENTITIES``), and the
#: subjectAltName type each reads, as ``getpeercert()`` names them (None: the subject's commonName).
_SAN_TYPES: dict[str, str | None] = {"subject_cn": None, "san_uri": "URI", "san_dns": "DNS", "san_email": "email"}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NEEDS_QUOTES = re.compile(r'[,;="\\\s]')


def certificate_identity(cert: Mapping[str, object], kind: str) -> str | None:
    """The identity ``kind`` picks from a decoded certificate (``getpeercert()``), or None.

    None when the certificate has no such name, or when the name holds a
    control character (it would be logged and sent upstream).
    """
    san_type = _SAN_TYPES[kind]
    found: str | None = None
    if san_type is None:
        subject = cert.get("subject", ())
        for rdn in subject if isinstance(subject, tuple) else ():
            for key, value in rdn:
                if key == "commonName" and found is None:
                    found = value
    else:
        names = cert.get("subjectAltName", ())
        for name_type, value in names if isinstance(names, tuple) else ():
            if name_type == san_type and found is None:
                found = value
    if not found or _CONTROL.search(found):
        return None
    return found


def _value(text: str, *, quote: bool = False) -> str | None:
    if _CONTROL.search(text):
        return None
    if quote or _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def xfcc_element(der: bytes) -> bytes:
    """The XFCC element of the certificate ``der`` (see the module docstring)."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    pairs = [f"Hash={hashlib.sha256(der).hexdigest()}"]
    subject = _value(cert.subject.rfc4514_string(), quote=True)
    if subject is not None:
        pairs.append(f"Subject={subject}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for key, kind in (("URI", x509.UniformResourceIdentifier), ("DNS", x509.DNSName)):
            for name in san.get_values_for_type(kind):
                value = _value(name)
                if value is not None:
                    pairs.append(f"{key}={value}")
    return ";".join(pairs).encode("utf-8")
