"""``-o encryption=on`` / ``encrypt.*``: qcow2 creation options for encryption, checked as
QEMU's qcow2_co_create_opts and the LUKS driver check them, with the secret resolved."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..crypto.secret import SECRETS
from ..errors import InvalidArgument

if TYPE_CHECKING:
    from ..crypto.luks import CreateOptions
    from ..qcow2.create import EncryptSpec

_LUKS_ONLY = ("cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time")


def luks_create_options(values: dict, prefix: str = "encrypt.") -> CreateOptions:
    """The LUKS creation options among ``-o`` values (QEMU's defaults for the rest); the luks
    format names them without qcow2's ``encrypt.`` prefix (``prefix=""``). The cipher library is
    imported here, when encryption is asked for, not by every create/convert."""
    from ..crypto.luks import CreateOptions

    luks = CreateOptions()
    for key in _LUKS_ONLY:
        value = values.get(f"{prefix}{key}")
        if value is not None:
            setattr(luks, key.replace("-", "_"), int(value) if key == "iter-time" else str(value))
    luks.validate()
    return luks


def encrypt_spec(values: dict) -> EncryptSpec | None:
    """The EncryptSpec the ``-o`` values ask for, or None; QEMU's messages for the rest."""
    sub = {k[len("encrypt."):]: v for k, v in values.items() if k.startswith("encrypt.")}
    legacy = values.get("encryption")
    if legacy is not None and "format" in sub:
        raise InvalidArgument("'encrypt.format' and its alias 'encryption' can't be used at the same time")
    if legacy is not None and legacy != "off":
        sub["format"] = "aes" if legacy == "on" else legacy
    if not sub:
        return None
    fmt = sub.pop("format", None)
    if fmt is None:
        raise InvalidArgument("Parameter 'encrypt.format' is missing")
    if fmt not in ("aes", "luks"):
        raise InvalidArgument(f"Parameter 'format' does not accept value '{fmt}'")
    luks = None
    if fmt == "aes":
        for key in _LUKS_ONLY:
            if key in sub:
                raise InvalidArgument(f"Parameter 'encrypt.{key}' is unexpected")
    else:
        luks = luks_create_options(values)
    from ..qcow2.create import EncryptSpec

    secret_id = sub.get("key-secret")
    if secret_id is None:
        raise InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher")
    return EncryptSpec(fmt, SECRETS.passphrase(str(secret_id)), luks)
