"""``--object secret,id=ID,data=...|file=...[,format=raw|base64]``: QEMU's secret objects.

QEMU keeps user-created objects in one tree per process, looked up by id wherever an option
names one (``encrypt.key-secret=ID``). ``SECRETS`` is that tree for secrets: the CLI fills it
from ``--object`` (and empties it before each command); library callers can pass passphrases
directly instead (``open_image(..., secret=b"...")``) and never touch it.
"""
from __future__ import annotations

import base64
import os
import binascii

from ..errors import InvalidArgument, QcowError


class SecretError(QcowError):
    """A secret that cannot be loaded or found; the message is QEMU's."""


def load_secret(props: dict) -> bytes:
    """The bytes a secret object's properties give (data or file, raw or base64)."""
    data, path = props.get("data"), props.get("file")
    if props.get("keyid") is not None or props.get("iv") is not None:
        raise InvalidArgument("Encrypted secrets (keyid/iv) are not supported by qcowpy")
    if data is None and path is None:
        raise SecretError("Either 'file' or 'data' must be provided")
    if data is not None and path is not None:
        raise SecretError("'file' and 'data' are mutually exclusive")
    fmt = props.get("format", "raw")
    if fmt not in ("raw", "base64"):
        raise InvalidArgument(f"Parameter 'format' does not accept value '{fmt}'")
    if path is not None:
        try:
            with open(str(path), "rb") as f:
                raw = f.read()
        except OSError as e:
            raise SecretError(f"Unable to read {path}: Failed to open file \u201c{path}\u201d: {e.strerror}") from None
    else:
        raw = str(data).encode("utf-8", "surrogateescape")
    if fmt == "base64":
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise SecretError("Base64 data contains invalid characters") from None
    return raw


def utf8_without_nul(value: bytes) -> bool:
    """glib's g_utf8_validate with a length, as QEMU checks passphrases: NUL is invalid too."""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in value


class SecretStore:
    """Secrets by id."""

    def __init__(self) -> None:
        self._by_id: dict[str, bytes] = {}

    def add(self, secret_id: str, value: bytes) -> None:
        self._by_id[secret_id] = value

    def clear(self) -> None:
        self._by_id.clear()

    def lookup(self, secret_id: str) -> bytes:
        if secret_id not in self._by_id:
            raise SecretError(f"No secret with id '{secret_id}'")
        return self._by_id[secret_id]

    def passphrase(self, secret_id: str) -> bytes:
        """As QEMU's qcrypto_secret_lookup_as_utf8: valid UTF-8 (glib's check, for which a NUL
        byte is invalid too)."""
        value = self.lookup(secret_id)
        if not utf8_without_nul(value):
            raise SecretError(f"Data from secret {secret_id} is not valid UTF-8")
        return value


#: the process's secret objects (QEMU's object tree, secrets only)
SECRETS = SecretStore()


def passphrase(secret: bytes | str) -> bytes:
    """A passphrase given directly (library callers): text as UTF-8; QEMU accepts no NUL byte
    (nor invalid UTF-8) in one, so neither do we."""
    value = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not utf8_without_nul(value):
        raise InvalidArgument("A passphrase must be valid UTF-8 without NUL bytes")
    return value


class KeyAttachments:
    """``encrypt.*`` node options the CLI took off a spec (``--image-opts ...,encrypt.key-secret=ID``
    or ``json:{...}``), by file, so that every tool that opens that file by its plain name
    unlocks it: the spec is reduced to the file, as for any other spec (cli/common.image_name)."""

    def __init__(self) -> None:
        self._by_path: dict[str, dict] = {}

    def attach(self, path: str, encrypt: dict) -> None:
        self._by_path[os.path.realpath(path)] = dict(encrypt)

    def get(self, path: str) -> dict | None:
        return self._by_path.get(os.path.realpath(path)) if self._by_path else None

    def clear(self) -> None:
        self._by_path.clear()


#: the CLI's per-command attachments (emptied with SECRETS)
ATTACHED = KeyAttachments()


def resolve_key(path: str, secret: bytes | str | None = None, encrypt: dict | None = None,
                no_io: bool = False) -> tuple[bytes | None, str | None]:
    """(passphrase, expected format) for opening ``path``: an explicit ``secret``, else the
    ``encrypt`` node options (``key-secret`` id, ``format``), else what the CLI attached.
    Without I/O (qemu-img info) the secret is not looked up, as in QEMU."""
    if secret is not None:
        return passphrase(secret), None
    enc = encrypt if encrypt is not None else ATTACHED.get(path)
    if not enc:
        return None, None
    fmt = enc.get("format")
    sid = enc.get("key-secret")
    if sid is None or no_io:
        return None, fmt
    return SECRETS.passphrase(str(sid)), fmt
