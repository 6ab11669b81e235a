"""TLS objects given as QEMU spells them: ``--object tls-creds-x509,id=ID,dir=DIR,endpoint=server`` and
``--object authz-simple,id=ID,identity=DN`` (commas inside a value are doubled, as in QEMU).

DIR holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``; with ``verify-peer=on`` (the
default, as in QEMU) clients must present a certificate signed by that CA.
"""
from __future__ import annotations

import os
import ssl

from ..block.spec import split_opts
from ..export.nbd.tls import CredsError, x509_server_context
from .common import CommandFailed


def parse_objects(objects: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``--object`` values by id; each is a dict of its comma-separated key=value properties."""
    out: dict[str, dict[str, str]] = {}
    for text in objects:
        props: dict[str, str] = {}
        parts = split_opts(text)
        if parts and "=" not in parts[0]:
            props["qom-type"] = parts.pop(0)
        for part in parts:
            key, _, value = part.partition("=")
            props[key] = value
        kind = props.get("qom-type", "")
        if kind not in ("tls-creds-x509", "authz-simple"):
            raise CommandFailed(f"Parameter 'qom-type' does not accept value '{kind}'")
        if not props.get("id"):
            raise CommandFailed("Parameter 'id' is missing")
        out[props["id"]] = props
    return out


def server_context(objects: tuple[str, ...], creds_id: str) -> ssl.SSLContext:
    props = parse_objects(objects).get(creds_id)
    if props is None or props["qom-type"] != "tls-creds-x509":
        raise CommandFailed(f"Failed to get TLS creds: No TLS credentials with id '{creds_id}'")
    if props.get("endpoint", "client") != "server":
        raise CommandFailed("Failed to get TLS creds: Expected TLS credentials for a server endpoint")
    try:
        return x509_server_context(props)
    except CredsError as e:
        raise CommandFailed(str(e)) from None


def client_dir(objects: tuple[str, ...], creds_id: str) -> str:
    """-L with --tls-creds: the directory of a client endpoint's credentials (ca-cert.pem, and
    client-cert.pem/client-key.pem when the server checks clients)."""
    props = parse_objects(objects).get(creds_id)
    if props is None or props["qom-type"] != "tls-creds-x509":
        raise CommandFailed(f"Failed to get TLS creds: No TLS credentials with id '{creds_id}'")
    if props.get("endpoint", "client") != "client":
        raise CommandFailed("Failed to get TLS creds: Expected TLS credentials for a client endpoint")
    d = props.get("dir", "")
    ca = os.path.join(d, "ca-cert.pem")
    if not os.access(ca, os.R_OK):
        raise CommandFailed(f"Unable to access credentials {ca}: No such file or directory")
    return d


def authz(objects: tuple[str, ...], authz_id: str):
    """--tls-authz ID: the authz-simple object's identity (a missing object refuses every client)."""
    from ..export.nbd.authz import Authz

    props = parse_objects(objects).get(authz_id)
    identity = props.get("identity") if props is not None and props["qom-type"] == "authz-simple" else None
    return Authz(authz_id, identity)
