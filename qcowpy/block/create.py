"""Create images of any supported format, resolving sizes from backing files as qemu-img does."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument
from ..format.constants import MAX_L1_SIZE_BYTES
from ..hostfile import HostFile, set_create_hints, size_new_file
from ..crypto.secret import passphrase

__all__ = ["create_image", "create_qcow2", "qcow2_options", "qcow2_size_fits", "backing_size"]
if TYPE_CHECKING:
    from ..crypto.luks import CreateOptions
    from ..qcow2.create import EncryptSpec, Qcow2Options
from ..units import parse_option_size, parse_size
from .open import open_image, resolve_backing_path
from .rbdspec import is_rbd_name

_BOOL = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    try:
        return _BOOL[str(value).lower()]
    except KeyError:
        raise InvalidArgument(f"Parameter '{name}' expects 'on' or 'off'") from None


def qcow2_options(size: int, **options: Any) -> Qcow2Options:
    """Map qemu-img style option names (dashes or underscores) to Qcow2Options."""
    from ..qcow2.create import Qcow2Options

    opts = Qcow2Options(size=size)
    options = dict(options)
    fmt, secret = options.pop("encrypt_format", None), options.pop("secret", None)
    luks = {k[len("encrypt_"):]: options.pop(k) for k in list(options) if k.startswith("encrypt_")}
    if fmt is not None:  # the Python API: encrypt_format="luks", secret=b"...", encrypt_iter_time=...
        opts.encrypt = encrypt_spec_for(str(fmt), secret, luks)
    elif secret is not None or luks:
        raise InvalidArgument("Parameter 'encrypt.format' is missing")
    for key, value in options.items():
        key = key.replace("-", "_")
        if value is None:
            continue
        if key == "cluster_size":
            opts.cluster_size = parse_option_size("cluster_size", value)
        elif key == "compat":
            opts.compat = str(value)
        elif key == "refcount_bits":
            opts.refcount_bits = int(value)
        elif key == "compression_type":
            opts.compression_type = str(value)
        elif key == "lazy_refcounts":
            opts.lazy_refcounts = _bool(key, value)
        elif key == "extended_l2":
            opts.extended_l2 = _bool(key, value)
        elif key == "preallocation":
            opts.preallocation = str(value)
        elif key == "backing_file":
            opts.backing_file = str(value)
        elif key == "backing_fmt":
            opts.backing_fmt = str(value)
        elif key == "encrypt":  # a qcow2.create.EncryptSpec (tools/encrypt_opts.py builds it)
            opts.encrypt = value
        elif key == "data_file":
            opts.data_file = str(value)
        elif key == "data_file_raw":
            opts.data_file_raw = _bool(key, value)
        elif key == "nocow":
            opts.nocow = _bool(key, value)
        elif key == "extent_size_hint":
            opts.extent_size_hint = parse_option_size(key, value)
        elif key == "warn":
            opts.warn = value
        else:
            raise InvalidArgument(f"Invalid parameter '{key.replace('_', '-') if False else key}'")
    return opts


def encrypt_spec_for(fmt: str, secret: bytes | str | None, luks: dict[str, Any]) -> EncryptSpec:
    """An EncryptSpec from Python keywords (``iter_time=10``, ``cipher_alg="aes-128"``...)."""
    if fmt not in ("luks", "aes"):
        raise InvalidArgument(f"Parameter 'format' does not accept value '{fmt}'")
    if secret is None:
        raise InvalidArgument("Parameter 'encrypt.key-secret' is required for cipher")
    if fmt == "aes" and luks:
        raise InvalidArgument(f"Parameter 'encrypt.{next(iter(luks)).replace('_', '-')}' is unexpected")
    from ..qcow2.create import EncryptSpec

    return EncryptSpec(fmt, passphrase(secret), luks_options(luks, "encrypt.") if fmt == "luks" else None)


def luks_options(luks: dict[str, Any], prefix: str = "") -> "CreateOptions":
    """LUKS creation options from Python keywords (``iter_time=10``, ``cipher_alg="aes-128"``);
    an unknown one is named with ``prefix`` as qemu-img names it."""
    from ..crypto.luks import CreateOptions  # loaded only when a LUKS image is made
    opts = CreateOptions()
    for key, value in luks.items():
        if not hasattr(opts, key):
            raise InvalidArgument(f"Invalid parameter '{prefix}{key.replace('_', '-')}'")
        setattr(opts, key, int(value) if key == "iter_time" else value)
    opts.validate()
    return opts


def create_qcow2(path: str, opts: Qcow2Options) -> None:
    """The qcow2 engine's creation (qcow2/create.py), loaded when a qcow2 image is made: a
    raw or rbd target never needs the engine."""
    from ..qcow2.create import create_qcow2 as create

    create(path, opts)


def qcow2_size_fits(size: int, cluster_size: int, extended_l2: bool) -> bool:
    """Whether the L1 table a qcow2 image of ``size`` bytes needs stays within QEMU's limit."""
    l2_entries = cluster_size // (16 if extended_l2 else 8)
    return -(-size // (cluster_size * l2_entries)) * 8 <= MAX_L1_SIZE_BYTES


def backing_size(path: str, backing_file: str, backing_fmt: str | None) -> int:
    with open_image(resolve_backing_path(path, backing_file), "r", backing_fmt) as dev:
        return dev.size


def _create_luks(path: str, size: int | None, options: dict[str, Any]) -> None:
    """``create_image(path, size, "luks", secret=b"...", iter_time=10, ...)``; ``luks`` (a
    CreateOptions) and ``password`` (bytes or a callable) are what the CLI hands over."""
    if size is None:
        raise InvalidArgument("Image creation needs a size parameter")
    file_opts = {k: options.pop(k) for k in ("preallocation", "nocow", "extent_size_hint", "warn") if k in options}
    hint = file_opts.get("extent_size_hint")
    password = options.pop("password", None)
    secret = options.pop("secret", None)
    opts = options.pop("luks", None) or luks_options(options)
    if password is None:
        if secret is None:
            raise InvalidArgument("Parameter 'key-secret' is required for cipher")
        password = passphrase(secret)
    from .luks import create_luks
    create_luks(path, size, opts, password, str(file_opts.get("preallocation") or "off"),
                _bool("nocow", file_opts.get("nocow", False)),
                None if hint is None else parse_option_size("extent_size_hint", hint), file_opts.get("warn"))


def create_image(path: str, size: int | str | None = None, format: str = "qcow2", **options: Any) -> None:
    """Create an image; with a backing file and no size, the backing file's size is used.

    Sizes may be ints or strings with qemu-img's suffixes ("20G", "64k").
    """
    if size is not None:
        size = parse_size(size)
    if format == "raw" and is_rbd_name(path):  # Ceph RBD (block/rbd.py)
        from .rbd import create_rbd_image
        return create_rbd_image(path, size, **options)
    if format == "raw":
        if options.get("backing_file"):
            raise InvalidArgument("'raw' does not support backing files")
        prealloc = str(options.pop("preallocation", None) or "off")
        nocow = _bool("nocow", options.pop("nocow", False))
        hint = options.pop("extent_size_hint", None)
        hint = None if hint is None else parse_option_size("extent_size_hint", hint)
        warn = options.pop("warn", None)
        for key in options:
            raise InvalidArgument(f"Invalid parameter '{key}'")
        if size is None:
            raise InvalidArgument("Image creation needs a size parameter")
        size = (size + 511) & ~511  # file-posix creates whole sectors
        f = HostFile(path, writable=True, create=True)
        try:
            message = set_create_hints(f.fd, nocow, hint)
            if message and warn is not None:
                warn(message)
            if prealloc not in ("off", "falloc", "full"):
                raise InvalidArgument(f"Invalid parameter '{prealloc}'")
            size_new_file(f, size, prealloc)
        finally:
            f.close()
        return
    if format == "luks":
        return _create_luks(path, size, options)
    if format != "qcow2":
        raise InvalidArgument(f"Unknown file format '{format}'")
    backing_file = options.get("backing_file")
    if size is None:
        if not backing_file:
            raise InvalidArgument("Image creation needs a size parameter")
        size = backing_size(path, backing_file, options.get("backing_fmt"))
    opts = qcow2_options(size, **options)
    opts.validate()
    if backing_file and not os.path.exists(resolve_backing_path(path, backing_file)):
        # qemu-img checks the backing file before writing anything
        backing_size(path, backing_file, options.get("backing_fmt"))
    create_qcow2(path, opts)
