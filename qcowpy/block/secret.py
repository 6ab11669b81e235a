"""Secret objects (``--object secret,id=ID,data=...|file=...[,format=raw|base64]``) by id.

QEMU's drivers name a secret by id (rbd's ``key-secret``/``password-secret``) instead of taking
the key inline, so it never shows in a process list or an image name. The CLI defines the
objects of each command here; drivers look them up when they open an image.
"""
from __future__ import annotations

import base64
import binascii
import threading

from ..errors import InvalidArgument

_SECRETS: dict[str, bytes] = {}
_lock = threading.Lock()


def define(objects: dict[str, dict]) -> None:
    """Load the ``secret`` objects among ``objects`` (id -> options), replacing earlier ones."""
    loaded: dict[str, bytes] = {}
    for oid, opts in objects.items():
        if opts.get("qom-type") != "secret":
            continue
        if ("data" in opts) == ("file" in opts):
            raise InvalidArgument("Either 'data' or 'file' must be provided")
        if "data" in opts:
            raw = str(opts["data"]).encode()
        else:
            try:
                with open(str(opts["file"]), "rb") as f:
                    raw = f.read()
            except OSError as e:
                raise InvalidArgument(f"Unable to read {opts['file']}: {e.strerror}") from None
        if opts.get("format", "raw") == "base64":
            try:
                raw = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidArgument("Failed to decode base64 data") from None
        elif opts.get("format", "raw") != "raw":
            raise InvalidArgument(f"Parameter 'format' does not accept value '{opts['format']}'")
        loaded[str(oid)] = raw
    with _lock:
        _SECRETS.clear()
        _SECRETS.update(loaded)


def lookup(secret_id: str) -> bytes:
    with _lock:
        value = _SECRETS.get(secret_id)
    if value is None:
        raise InvalidArgument(f"No secret with id '{secret_id}'")
    return value
