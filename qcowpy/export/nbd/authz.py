"""Client-certificate authorization (qemu-nbd's ``--tls-authz`` with an ``authz-simple`` object)."""
from __future__ import annotations

from dataclasses import dataclass

# Python's names for certificate attributes, as GnuTLS spells them in a distinguished name
_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "stateOrProvinceName": "ST", "localityName": "L", "emailAddress": "EMAIL", "domainComponent": "DC",
          "streetAddress": "STREET", "userId": "UID", "serialNumber": "serialNumber", "title": "title"}


def peer_dn(cert: dict) -> str | None:
    """The subject of a certificate from ``SSLSocket.getpeercert()`` as QEMU compares identities: RFC 4514
    escaping in certificate order, as GnuTLS's gnutls_x509_crt_get_dn prints it ("C=GB,O=Example\\, Inc,CN=laptop");
    None without a certificate."""
    subject = cert.get("subject") if cert else None
    if not subject:
        return None
    rdns = ["+".join(f"{_SHORT.get(k, k)}={_escape(v)}" for k, v in rdn) for rdn in subject]
    return ",".join(rdns)


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out


@dataclass(frozen=True)
class Authz:
    """Only a client whose certificate names exactly ``identity`` may negotiate. ``identity`` None
    means the named object does not exist: every client is refused (qemu-nbd starts anyway)."""

    object_id: str
    identity: str | None

    def deny(self, cert: dict) -> str | None:
        """Why this client may not go on, or None when it may."""
        if self.identity is None:
            return f"Cannot find QAuthZ object ID {self.object_id}"
        dn = peer_dn(cert)
        if dn != self.identity:
            return f"TLS x509 authz check for {dn or 'a client without certificate'} is denied"
        return None
