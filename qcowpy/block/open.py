"""Open images by path: format probing, backing file resolution and chains."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from ..crypto.secret import SecretError, resolve_key
from ..errors import EncryptionError, FormatError, ImageNotFound, InvalidArgument, QcowError, UnsupportedFeature
from ..format.constants import LUKS_MAGIC, MAGIC
from .device import BlockDevice
from .names import NBD_SCHEMES, is_nbd_uri
from .raw import RawDevice
from .rbdspec import PREFIX as RBD_PREFIX, is_rbd_name
from .. import hostfile
from .spec import NullDevice, file_protocol_path, is_json_filename, open_spec, parse_json_filename

FORMATS = ("qcow2", "raw", "luks")
MAX_CHAIN_DEPTH = 256

# Magic numbers of formats we recognise but do not read, so probing does not call them raw.
_OTHER_MAGIC = {b"QFI\xfc": "qcow", b"KDMV": "vmdk", b"conectix": "vpc", b"vhdxfile": "vhdx", b"QED\x00": "qed"}


def _rbd_host_file(path: str, **kwargs):
    """``rbd:`` names for the qcow2 engine's host file; the rbd driver loads on first use
    (importing it registers its own opener in place of this one)."""
    from . import rbdopen
    return rbdopen.open_host(path, **kwargs)


hostfile.PROTOCOLS.setdefault(RBD_PREFIX, _rbd_host_file)


def _nbd_host_file(path: str, **kwargs):
    """NBD URIs for the qcow2 engine's host file (a qcow2 image in an export); the NBD client
    loads on first use, as for rbd."""
    from . import nbdfile
    return nbdfile.open_host(path, **kwargs)


for _scheme in NBD_SCHEMES:
    hostfile.PROTOCOLS.setdefault(_scheme, _nbd_host_file)


def probe_format(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ImageNotFound(f"Could not open '{path}': No such file or directory") from None
    except OSError as e:
        raise QcowError(f"Could not open '{path}': {e.strerror}") from None
    fmt = probe_bytes(head)
    if fmt not in FORMATS:
        raise UnsupportedFeature(f"Image format '{fmt}' of '{path}' is not supported")
    return fmt


NULL_FILENAMES = ("null-co://", "null-aio://")


def probe_bytes(head: bytes) -> str:
    """The format the first bytes of an image announce: "qcow2", another format's name, or "raw"."""
    if head[:4] == MAGIC:
        return "qcow2"
    if head[:6] == LUKS_MAGIC and head[6:8] == b"\0\1":  # QEMU probes LUKS version 1 only
        return "luks"
    for magic, name in _OTHER_MAGIC.items():
        if head.startswith(magic):
            return name
    return "raw"


def resolve_backing_path(overlay: str, backing: str) -> str:
    """A relative backing name is relative to the overlay's directory, as in QEMU; ``file:``
    and ``json:`` names are taken as QEMU takes them (block/spec.py)."""
    if is_json_filename(backing) or backing in NULL_FILENAMES:
        return backing
    backing = file_protocol_path(backing)
    if is_rbd_name(backing) or is_nbd_uri(backing):
        return backing
    if ":" in backing.split("/", 1)[0] and not os.path.exists(backing):
        raise UnsupportedFeature(f"Backing file '{backing}' uses a protocol qcowpy does not support")
    if os.path.isabs(backing):
        return backing
    return os.path.join(os.path.dirname(overlay), backing)


def open_image(path: str, mode: str = "r", format: str | None = None, backing: bool = True,
               cache: str = "writeback", _seen: tuple = (), force_share: bool = False,
               secret: bytes | str | None = None, no_io: bool = False, encrypt: dict | None = None,
               data_file: str | None = None) -> BlockDevice:
    """Open ``path`` (and, unless ``backing`` is False, its whole backing chain read-only).

    ``force_share`` (qemu-img's ``-U``) opens read-only images without conflicting with, or
    being stopped by, another process's QEMU-compatible locks (qcowpy/lock.py).
    ``secret`` is the passphrase of an encrypted image (LUKS, or the legacy AES key);
    ``encrypt`` the ``encrypt.*`` node options naming a ``--object secret`` instead; ``no_io``
    opens an encrypted image without its key, for its header only (qemu-img info). ``data_file``
    overrides a qcow2 image's external data file (QEMU's ``data-file`` option)."""
    if mode not in ("r", "r+", "rb", "r+b", "rw"):
        raise InvalidArgument(f"Invalid mode '{mode}' (use 'r' or 'r+')")
    path = file_protocol_path(path)
    if is_json_filename(path):  # json:{...}: a node tree (block/spec.py)
        opts = parse_json_filename(path)
        if format is not None:
            opts.setdefault("driver", format)
        return open_spec(opts, mode, force_share, backing, no_io=no_io)
    proto = path.partition(":")[0]
    if f"{proto}://" in NULL_FILENAMES:  # QEMU's null block drivers by filename: a 1 GiB disk of zeros
        if path != f"{proto}://":
            raise InvalidArgument(f"The only allowed filename for this driver is '{proto}://'")
        if format not in (None, "raw"):
            raise FormatError(f"Image is not in {format} format")
        dev = NullDevice(1 << 30, format="raw")
        dev.has_image_info = False  # QEMU's null driver has no get_info: info shows no dirty-flag
        return dev
    writable = "+" in mode or mode == "rw"
    if is_nbd_uri(path):
        from .nbd import open_nbd
        return open_nbd(path, writable, format, backing)
    if is_rbd_name(path):  # Ceph RBD (block/rbd.py); librbd is loaded only now
        from . import rbdopen
        return rbdopen.open_rbd_image(path, writable, format, backing, cache, _seen, force_share)
    fmt = format or probe_format(path)
    if fmt not in FORMATS:
        raise InvalidArgument(f"Unknown driver '{fmt}'")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageNotFound(f"Could not open '{path}': No such file or directory") from None
    ident = (st.st_dev, st.st_ino)
    if ident in _seen:
        raise QcowError(f"Backing file chain of '{path}' contains a loop")
    if len(_seen) >= MAX_CHAIN_DEPTH:
        raise QcowError(f"Backing file chain is deeper than {MAX_CHAIN_DEPTH} images")
    if fmt == "raw":
        return RawDevice(path, read_only=not writable, cache=cache, force_share=force_share)
    key, efmt = resolve_key(path, secret, encrypt, no_io)
    if fmt == "luks":  # encrypt: the luks node's own options ({"key-secret": ID})
        from .luks import LuksDevice
        return LuksDevice(RawDevice(path, read_only=not writable, cache=cache, force_share=force_share), key, no_io)
    from ..qcow2.image import Qcow2Image  # the engine loads with the first qcow2 image (raw, rbd
    from .qcow2 import Qcow2Device  # and nbd copies never need it)

    dev = Qcow2Device(Qcow2Image.open(path, writable=writable, cache=cache, force_share=force_share,
                                      secret=key, no_io=no_io, encrypt_format=efmt, data_file=data_file), path)
    info = dev.format_info()
    name = info.backing_file
    if backing and name:
        try:
            dev.attach_backing(open_backing(path, name, info.backing_format, _seen + (ident,), force_share))
        except BaseException:
            dev.close()
            raise
    return dev


@contextlib.contextmanager
def key_errors_name(filename: str) -> Iterator[None]:
    """Secret and passphrase failures name the image as QEMU's open errors do."""
    try:
        yield
    except (SecretError, EncryptionError) as e:
        raise type(e)(f"Could not open '{filename}': {e}") from None


def open_backing(overlay: str, name: str, fmt: str | None, seen: tuple, force_share: bool = False) -> BlockDevice:
    """The backing chain under ``overlay`` (whose backing file is ``name``), read-only; ``seen``
    holds the (st_dev, st_ino) of the images above it, for loop detection. Failures name the
    backing file, as QEMU's do."""
    try:
        return open_image(resolve_backing_path(overlay, name), "r", fmt, True, _seen=seen,
                          force_share=force_share)
    except (ImageNotFound, FormatError, InvalidArgument) as e:
        raise type(e)(f"Could not open backing file: {e}") from None
