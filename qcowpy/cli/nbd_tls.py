"""TLS objects given as QEMU spells them: ``--object tls-creds-x509,id=ID,dir=DIR,endpoint=server`` and
``--object authz-simple,id=ID,identity=DN`` (commas inside a value are doubled, as in QEMU).

DIR holds ``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``; with ``verify-peer=on`` (the
default, as in QEMU) clients must present a certificate signed by that CA.
"""
from __future__ import annotations

import os
import ssl

from ..block.spec import split_opts
from .common import CommandFailed

_FALSE = ("off", "no", "false", "0")


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
    d = props.get("dir", "")
    verify = props.get("verify-peer", "on").lower() not in _FALSE
    paths = {name: os.path.join(d, name) for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem")}
    for p in paths.values():
        if not os.access(p, os.R_OK):
            raise CommandFailed(f"Unable to access credentials {p}: No such file or directory")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(paths["server-cert.pem"], paths["server-key.pem"])
        ctx.load_verify_locations(paths["ca-cert.pem"])
    except (ssl.SSLError, OSError) as e:
        raise CommandFailed(f"Unable to load TLS credentials in {d}: {e}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    return ctx


def authz(objects: tuple[str, ...], authz_id: str):
    """--tls-authz ID: the authz-simple object's identity (a missing object refuses every client)."""
    from ..export.nbd.authz import Authz

    props = parse_objects(objects).get(authz_id)
    identity = props.get("identity") if props is not None and props["qom-type"] == "authz-simple" else None
    return Authz(authz_id, identity)
