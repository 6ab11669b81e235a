"""TLS for the NBD server from a ``tls-creds-x509`` object's properties (QEMU's crypto/tlscredsx509.c
file layout: ``DIR/ca-cert.pem``, ``DIR/server-cert.pem``, ``DIR/server-key.pem``)."""
from __future__ import annotations

import os
import ssl
from typing import Any

from ...errors import QcowError

_FALSE = ("off", "no", "false", "0")


class CredsError(QcowError):
    """The credentials cannot be loaded (the message is QEMU's)."""


def x509_server_context(props: dict[str, Any]) -> ssl.SSLContext:
    """A server context; with ``verify-peer`` (on by default, as in QEMU) clients must present a
    certificate signed by the CA."""
    d = str(props.get("dir", ""))
    verify = str(props.get("verify-peer", "on")).lower() not in _FALSE
    paths = {name: os.path.join(d, name) for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem")}
    for p in paths.values():
        if not os.access(p, os.R_OK):
            raise CredsError(f"Unable to access credentials {p}: No such file or directory")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(paths["server-cert.pem"], paths["server-key.pem"])
        ctx.load_verify_locations(paths["ca-cert.pem"])
    except (ssl.SSLError, OSError) as e:
        raise CredsError(f"Unable to load TLS credentials in {d}: {e}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    return ctx
