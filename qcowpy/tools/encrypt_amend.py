"""qemu-img amend's ``encrypt.*`` options on a LUKS qcow2 image: add or erase key slots.

The ``amend`` command (built separately) hands the options here as ``-o`` gives them, secrets
by ``--object`` id; the key-slot work itself is ``qcow2.encryption.amend_keyslots``.
"""
from __future__ import annotations

from ..block.device import BlockDevice
from ..crypto.luks import AmendOptions
from ..crypto.secret import SECRETS
from ..errors import InvalidArgument, UnsupportedFeature
from ..qcow2.encryption import amend_keyslots

#: QEMU's qcow2 amend options for encryption (name -> help), in its -o help order
AMEND_OPTIONS = {
    "encrypt.iter-time": "Time to spend in PBKDF in milliseconds",
    "encrypt.keyslot": "Select a single keyslot to modify explicitly",
    "encrypt.new-secret": "New secret to set in the matching keyslots. Empty string to erase",
    "encrypt.old-secret": "Select all keyslots that match this password",
    "encrypt.state": "Select new state of affected keyslots (active/inactive)",
}


def amend_encryption(dev: BlockDevice, values: dict, force: bool = False, prefix: str = "encrypt.") -> None:
    """Apply ``values`` (``{"encrypt.state": "active", "encrypt.new-secret": ID, ...}``) to the
    image ``dev`` (opened read-write with its key), with QEMU's checks and messages. The luks
    format names the same options without ``prefix`` (``prefix=""``); its device holds the
    crypto state itself, where a qcow2 device's engine (``dev.image``) does."""
    opts = {k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)}
    unknown = [k for k in opts if f"encrypt.{k}" not in AMEND_OPTIONS]
    if unknown:
        raise InvalidArgument(f"Invalid parameter '{prefix}{unknown[0]}'")
    img = getattr(dev, "image", dev)
    crypto = getattr(img, "crypto", None)
    if crypto is None:
        raise InvalidArgument("Can't amend encryption options - encryption not present")
    if crypto.luks is None:
        raise UnsupportedFeature("Only LUKS encryption options can be amended")
    state = opts.get("state")
    if state is None:
        raise InvalidArgument("Parameter 'state' is missing")
    if state not in ("active", "inactive"):
        raise InvalidArgument(f"Parameter 'state' does not accept value '{state}'")

    def number(key: str) -> int | None:
        if key not in opts:
            return None
        try:
            return int(str(opts[key]), 0)
        except ValueError:
            raise InvalidArgument(f"Parameter '{prefix}{key}' expects a number") from None

    def secret(key: str) -> bytes | None:
        return SECRETS.passphrase(str(opts[key])) if key in opts else None
    amend_keyslots(img, AmendOptions(state, new_secret=secret("new-secret"), old_secret=secret("old-secret"),
                                     keyslot=number("keyslot"), iter_time=number("iter-time"),
                                     secret=crypto.password if state == "active" else None), force)
