"""User-creatable objects of the storage daemon (``--object``, QMP ``object-add``/``object-del``).

The daemon uses three: ``tls-creds-x509`` (the NBD server's TLS, loaded and checked when created,
as QEMU does), ``authz-simple`` (``tls-authz``) and ``iothread`` (accepted: every export runs on
its own threads). ``secret`` goes into the process's secret store (crypto/secret.py), where
``encrypt.key-secret=ID`` and rbd's ``key-secret=ID`` find it. Other types QEMU
knows are refused with its wording for an unknown type. Messages are QSD's.
"""
from __future__ import annotations

import os
from typing import Any

from ..crypto.secret import SECRETS, load_secret
from ..errors import QcowError
from .daemon import Daemon
from .keyval import OptionError, no_more, take, take_bool, take_int
from .nbd.tls import CredsError, x509_server_context

TYPES = ("secret", "iothread", "tls-creds-x509", "authz-simple")


def object_add(daemon: Daemon, opts: dict[str, Any]) -> None:
    opts = dict(opts)
    qom_type = take(opts, "qom-type", required=True)
    if qom_type not in TYPES:
        raise OptionError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    oid = take(opts, "id", required=True)
    obj: dict[str, Any] = {"qom-type": qom_type, "id": oid}
    if qom_type == "secret":
        obj["data"] = _secret(opts)
    elif qom_type == "iothread":
        for key in ("poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch", "thread-pool-min",
                    "thread-pool-max"):
            if key in opts:
                take_int(opts, key, 0)
    elif qom_type == "authz-simple":
        obj["identity"] = str(take(opts, "identity", required=True))
    else:
        _x509(opts, obj)
    no_more(opts)
    with daemon.lock:
        if oid in daemon.objects:
            raise OptionError(f"attempt to add duplicate property '{oid}' to object (type 'container')")
        daemon.objects[oid] = obj
    if qom_type == "secret":  # what encrypt.key-secret= and rbd's key-secret= look up
        SECRETS.add(str(oid), obj["data"])


def object_del(daemon: Daemon, oid: str) -> None:
    with daemon.lock:
        if oid not in daemon.objects:
            raise OptionError(f"object '{oid}' not found")
        del daemon.objects[oid]


def _secret(opts: dict[str, Any]) -> bytes:
    try:
        value = load_secret(opts)
    except QcowError as e:
        raise OptionError(str(e)) from None
    for key in ("data", "file", "format", "keyid", "iv"):
        opts.pop(key, None)
    return value


def _x509(opts: dict[str, Any], obj: dict[str, Any]) -> None:
    endpoint = take(opts, "endpoint", default="client")
    if endpoint not in ("client", "server"):
        raise OptionError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    d = take(opts, "dir")
    verify = take_bool(opts, "verify-peer", True)
    for key in ("priority", "sanity-check", "passwordid", "loaded"):
        opts.pop(key, None)
    if d is None:
        raise OptionError("Missing 'dir' property value")
    obj.update({"endpoint": endpoint, "dir": str(d), "verify-peer": "on" if verify else "off"})
    if endpoint == "server":
        try:
            obj["context"] = x509_server_context(obj)
        except CredsError as e:
            raise OptionError(str(e)) from None
    else:
        ca = os.path.join(str(d), "ca-cert.pem")
        if not os.access(ca, os.R_OK):
            raise OptionError(f"Unable to access credentials {ca}: No such file or directory")
