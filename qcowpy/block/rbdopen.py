"""Formats over rbd: probing an rbd image, and qcow2 images stored on rbd.

QEMU stacks a format node (raw, or qcow2) on the rbd protocol node; so does this module. The
qcow2 engine reaches its host file through ``hostfile.open_host_file``, and ``rbd:`` names are
registered there with :class:`RbdFile`, so a qcow2 image on rbd is created, opened, grown and
flushed by the same engine code as one in a local file. Like QEMU's rbd driver, a write past
the end of the rbd image grows it first (that is how a qcow2 image on rbd allocates).
"""
from __future__ import annotations

import errno
import threading
from typing import Any

from .. import hostfile
from ..errors import InvalidArgument, ReadOnlyError
from ..format.constants import MAGIC
from .device import BlockDevice
from .devicefile import DeviceFile
from .rbd import RbdDevice, create_rbd, location
from .rbdspec import PREFIX, RbdLocation, parse_filename
from ..crypto.secret import SECRETS

#: rbd: names this module made up for node options (json:/--image-opts) -> their location, so
#: the engine's open_host_file finds the options (a key secret never goes into a name)
_LOCATIONS: dict[str, RbdLocation] = {}
_names_lock = threading.Lock()


class RbdFile(DeviceFile):
    """A host file on an rbd image, for the qcow2 engine: writes past the end grow the image."""

    def __init__(self, dev: RbdDevice, writable: bool, unsafe: bool = False):
        super().__init__(dev)
        self.rbd = dev
        self.writable = writable
        self.unsafe = unsafe
        self.dirty = False

    def pwrite(self, data, offset: int) -> None:
        if not self.writable:
            raise ReadOnlyError(f"'{self.path}' is opened read-only")
        n = len(memoryview(data).cast("B"))
        if offset + n > self.rbd.size:
            self.rbd.resize(offset + n)
        self.rbd.pwrite(data, offset)
        self.dirty = True

    def truncate(self, size: int) -> None:
        if not self.writable:
            raise ReadOnlyError(f"'{self.path}' is opened read-only")
        self.rbd.resize(size)
        self.dirty = True

    def allocate(self, offset: int, length: int) -> None:
        if offset + length > self.rbd.size:
            self.truncate(offset + length)

    def punch(self, offset: int, length: int) -> bool:
        end = min(offset + length, self.rbd.size)
        if end > offset:
            self.rbd.discard(end - offset, offset)
            self.dirty = True
        return True

    def flush(self) -> None:
        if self.dirty and self.writable and not self.unsafe:
            self.rbd.flush()
        self.dirty = False

    def allocated_bytes(self) -> int:
        raise OSError(errno.ENOTSUP, "unknown for an rbd image")

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.rbd.close()


def _location_of(name: str) -> RbdLocation:
    with _names_lock:
        loc = _LOCATIONS.get(name)
    return loc if loc is not None else parse_filename(name)


def open_host(path: str, writable: bool = False, create: bool = False, cache: str = "writeback",
               force_share: bool = False) -> RbdFile:
    """hostfile.open_host_file for ``rbd:`` names (creating an empty image when asked, as QEMU's
    qcow2 create does on a protocol)."""
    loc = _location_of(path)
    if create:
        create_rbd(loc, 0, secret=SECRETS.lookup)
    dev = RbdDevice(loc, read_only=not writable, name=path, cache=cache not in ("none", "directsync"),
                    secret=SECRETS.lookup)
    return RbdFile(dev, writable, cache == "unsafe")


hostfile.PROTOCOLS[PREFIX] = open_host


def name_for(loc: RbdLocation) -> str:
    """An ``rbd:`` name standing for ``loc`` inside this process (see _LOCATIONS)."""
    name = f"{PREFIX}{_esc(loc.pool)}/" + (f"{_esc(loc.namespace)}/" if loc.namespace else "") + _esc(loc.image)
    if loc.snapshot is not None:
        name += "@" + _esc(loc.snapshot)
    name += f":=qcowpy-node={id(loc)}"  # never a Ceph option: the location comes from the table
    with _names_lock:
        _LOCATIONS[name] = loc
    return name


def _esc(s: str) -> str:
    return "".join("\\" + c if c in ":@/=\\" else c for c in s)


def open_rbd_image(name: str | dict, writable: bool, fmt: str | None, backing: bool = True, cache: str = "writeback",
                   seen: tuple = (), force_share: bool = False, bare: bool = False) -> BlockDevice:
    """An rbd image as ``fmt`` (probed when None): raw, or the qcow2 engine over an RbdFile.
    ``bare`` is a protocol node opened without a format on top (``driver=rbd``)."""
    loc = location(name)
    dev = RbdDevice(loc, read_only=not writable, name=name if isinstance(name, str) else None,
                    cache=cache not in ("none", "directsync"), secret=SECRETS.lookup,
                    fmt_name="rbd" if bare else "raw")
    try:
        if bare:
            return dev
        if fmt is None:
            fmt = "qcow2" if dev.size >= 4 and dev.pread(4, 0) == MAGIC else "raw"
        if fmt == "raw":
            return dev
        if fmt != "qcow2":
            raise InvalidArgument(f"Unknown driver '{fmt}'")
    except BaseException:
        dev.close()
        raise
    dev.close()
    return _open_qcow2(loc, name, writable, backing, cache, seen, force_share)


def _open_qcow2(loc: RbdLocation, name: str | dict, writable: bool, backing: bool, cache: str, seen: tuple,
                force_share: bool) -> BlockDevice:
    from ..qcow2.image import Qcow2Image
    from .open import MAX_CHAIN_DEPTH, open_backing
    from .qcow2 import Qcow2Device

    path = name if isinstance(name, str) else name_for(loc)
    ident = ("rbd", loc.pool, loc.namespace or "", loc.image, loc.snapshot)
    if ident in seen:
        raise InvalidArgument(f"Backing file chain of '{path}' contains a loop")
    if len(seen) >= MAX_CHAIN_DEPTH:
        raise InvalidArgument(f"Backing file chain is deeper than {MAX_CHAIN_DEPTH} images")
    q = Qcow2Device(Qcow2Image.open(path, writable=writable, cache=cache), loc.display_name(None))
    q.display_name = loc.display_name("qcow2")
    try:
        info = q.format_info()
        if backing and info is not None and info.backing_file:
            q.attach_backing(open_backing(path, info.backing_file, info.backing_format, seen + (ident,), force_share))
    except BaseException:
        q.close()
        raise
    return q


def rbd_options(opts: dict[str, Any]) -> dict[str, Any] | None:
    """The rbd node of a spec: the node itself (driver=rbd) or its ``file`` child; else None."""
    if opts.get("driver") == "rbd":
        return opts
    child = opts.get("file")
    if isinstance(child, dict) and child.get("driver") == "rbd":
        return child
    return None
