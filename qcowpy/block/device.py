"""The block device interface every driver implements, and chain-aware block status."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from ..errors import InvalidArgument, UnsupportedFeature

if TYPE_CHECKING:
    from ..format.snapshot import Snapshot

__all__ = ["BlockDevice", "BitmapInfo", "Extent", "FormatInfo", "LayerStatus", "status_at",
           "is_allocated", "is_allocated_above"]


@dataclass(frozen=True)
class LayerStatus:
    """Status of a run of guest bytes in one layer of a chain (QEMU's BDRV_BLOCK_* bits)."""

    start: int
    length: int
    data: bool
    zero: bool
    offset: int | None = None  # host offset in ``filename`` when the bytes are stored plainly
    filename: str | None = None

    @property
    def allocated(self) -> bool:
        return self.data or self.zero


@dataclass(frozen=True)
class Extent:
    """One run of ``block_status``: where in the chain the bytes come from and what they are."""

    start: int
    length: int
    depth: int  # 0 = this image, 1 = its backing file, ...
    present: bool  # allocated in some layer (False: reads as zeros because nothing has it)
    zero: bool
    data: bool
    offset: int | None = None
    filename: str | None = None


@dataclass(frozen=True)
class FormatInfo:
    """What an image format's header says, for the tools (qemu-img's ImageInfoSpecific)."""

    cluster_size: int
    version: int
    backing_file: str | None
    backing_format: str | None
    dirty: bool
    corrupt: bool
    lazy_refcounts: bool
    refcount_bits: int
    extended_l2: bool
    compression_type: str
    data_file: str | None
    data_file_raw: bool
    encrypt: dict | None = None  # QCryptoBlockInfo of an encrypted image ("format", LUKS fields)


@dataclass(frozen=True)
class BitmapInfo:
    """A persistent dirty bitmap as the image's bitmap directory describes it."""

    name: bytes
    name_size: int
    granularity_bits: int
    flags: int = 0  # the directory entry's flags: 1 in_use, 2 auto (enabled)

    @property
    def in_use(self) -> bool:
        return bool(self.flags & 1)

    @property
    def enabled(self) -> bool:
        return bool(self.flags & 2)


class ReadsInto:
    """For drivers whose own read fills the caller's buffer (network stores, decryption, a
    device seen as a file): ``pread`` on top of their ``preadinto``."""

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.preadinto(memoryview(buf), offset)  # type: ignore[attr-defined]
        return bytes(buf)


class BlockDevice(ABC):
    """A guest-visible disk: random-access bytes of a fixed size, plus allocation status.

    Arguments follow ``os.pread``/``os.pwrite`` order. Every method is safe to call from
    several threads. Devices are context managers; closing also closes the backing chain.
    """

    format: str
    filename: str
    read_only: bool
    backing: "BlockDevice | None" = None
    display_name: str | None = None  # how QEMU names the image when it differs from the path (nbd URIs)
    has_image_info = True  # False where QEMU's driver has no get_info (info then omits dirty-flag)
    holes_read_zero = True  # what block status says of a run no layer has (False: QEMU's null-co)
    has_zero_init = True  # a new image reads as zeros before anything is written (QEMU's bdrv_has_zero_init)

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def pread(self, length: int, offset: int) -> bytes: ...

    def preadinto(self, buf: bytearray | memoryview, offset: int) -> None:
        """Read ``len(buf)`` bytes into ``buf``; drivers override it to skip the intermediate copy
        (a device model reads straight into guest RAM this way)."""
        view = memoryview(buf).cast("B")
        view[:] = self.pread(len(view), offset)

    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        """Fill ``bufs`` (byte views) from consecutive guest bytes at ``offset`` — QEMU's
        vectored read, what a device model does with requests it merged. Drivers that can map
        the whole range once and read it with one system call override this."""
        for buf in bufs:
            self.preadinto(buf, offset)
            offset += len(buf)

    @abstractmethod
    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None: ...

    @abstractmethod
    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None: ...

    @abstractmethod
    def discard(self, length: int, offset: int) -> None: ...

    @abstractmethod
    def flush(self) -> None: ...

    @abstractmethod
    def truncate(self, size: int, preallocation: str = "off") -> None:
        """Change the virtual size (``qemu-img resize``); ``preallocation`` maps the new area."""

    @abstractmethod
    def layer_status(self, offset: int, length: int, max_extents: int | None = None) -> Iterator[LayerStatus]:
        """Status of the range in this layer alone; unallocated runs have data=zero=False.

        Runs are maximal; ``max_extents`` lets a caller that needs only the first run stop early.
        """

    @abstractmethod
    def _close_self(self) -> None: ...

    # ---- what a format may offer beyond bytes; the defaults are a raw file's answers
    @property
    def cluster_size(self) -> int | None:
        """The allocation unit of the format, or None when it has none (raw)."""
        return None

    def format_info(self) -> FormatInfo | None:
        return None

    def allocated_size(self) -> int | None:
        """Host bytes the image occupies (qemu-img's "disk size"), None when unknown."""
        return None

    @property
    def can_write_compressed(self) -> bool:
        return False

    def write_compressed(self, data: bytes, offset: int) -> None:
        """Write one whole cluster compressed (only where ``can_write_compressed``)."""
        raise UnsupportedFeature(f"Format '{self.format}' does not support compressed writes")

    def write_compressed_many(self, items: list[tuple[bytes, int]]) -> None:
        """Several ``(cluster, offset)`` compressed writes in order; formats that can, compress
        them in parallel."""
        for data, offset in items:
            self.write_compressed(data, offset)

    supports_snapshots = False
    #: a driver's own read-ahead for sequential readers (rbd); a caller that reads ahead
    #: itself (convert's copier) turns it off, so the two do not fetch each other's runs
    read_ahead = False
    #: chunk-sized requests the device serves in parallel to good effect: a local file's two
    #: (the page cache does the rest); a network store (rbd) needs more in flight to hide latency
    io_depth = 2

    def snapshots(self) -> list[Snapshot]:
        """The internal snapshots (none where the format has none)."""
        return []

    def snapshot_create(self, name: str) -> Snapshot:
        raise UnsupportedFeature("Operation not supported")

    def snapshot_apply(self, key: str) -> None:
        raise UnsupportedFeature("Block driver does not support snapshots")

    def snapshot_delete(self, key: str) -> None:
        raise UnsupportedFeature("Block driver does not support snapshots")

    def snapshot_load_tmp(self, snapshot_id: str | None, name: str | None) -> None:
        """Show an internal snapshot instead of the active disk, read-only, in memory only."""
        raise UnsupportedFeature(f"Block format '{self.format}' used by device '' does not support "
                                 "temporarily loading internal snapshots")

    def bitmaps(self) -> list[BitmapInfo]:
        """The persistent dirty bitmaps (the valid ones; none where the format has none)."""
        return []

    supports_bitmaps = False  # persistent dirty bitmaps (QEMU's bdrv_supports_persistent_dirty_bitmap)

    def bitmap_op(self, op: str, name: bytes, **args) -> None:
        """One ``qemu-img bitmap`` operation (add, remove, clear, enable, disable, merge) on the
        persistent bitmap ``name``; formats without bitmaps refuse, as QEMU does."""
        if op == "add":
            raise UnsupportedFeature("Can't store persistent bitmaps to #block0: Operation not supported")
        raise UnsupportedFeature(f"Dirty bitmap '{name.decode('utf-8', 'replace')}' not found")

    def bitmap_dirty(self, name: bytes) -> list[tuple[int, int]]:
        """(offset, length) ranges the bitmap ``name`` marks dirty."""
        raise UnsupportedFeature(f"Dirty bitmap '{name.decode('utf-8', 'replace')}' not found")

    def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        raise UnsupportedFeature(f"Format '{self.format}' does not support backing files")

    def make_empty(self) -> None:
        """Drop every allocation of this layer (what ``qemu-img commit`` leaves of the top)."""
        raise UnsupportedFeature(f"Format '{self.format}' cannot be emptied")

    def close(self) -> None:
        try:
            self._close_self()
        finally:
            if self.backing is not None:
                self.backing.close()

    def __enter__(self) -> "BlockDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"Range {offset}+{length} is outside the image (size {self.size})")

    @property
    def chain(self) -> list["BlockDevice"]:
        out: list[BlockDevice] = []
        dev: BlockDevice | None = self
        while dev is not None:
            out.append(dev)
            dev = dev.backing
        return out

    def block_status(self, offset: int = 0, length: int | None = None) -> list[Extent]:
        """Where each byte of the range comes from, walking the backing chain as qemu-img map does."""
        if length is None:
            length = self.size - offset
        self.check_range(offset, length)
        return list(_chain_status(self, offset, length, 0))


def _chain_status(dev: "BlockDevice", offset: int, length: int, depth: int,
                  first: bool = False) -> Iterator[Extent]:
    """Where each run of the range comes from, from one pass over each layer: the layer's runs
    in order, the unallocated ones resolved by the layers below (a 20 GiB image is a few
    scans of its L2 tables, not one fresh scan per extent). ``first`` asks each layer for its
    first run only (:func:`status_at`)."""
    for st in dev.layer_status(offset, length, 1 if first else None):
        if st.allocated:
            yield Extent(st.start, st.length, depth, True, st.zero, st.data, st.offset,
                         st.filename if st.offset is not None else None)
            continue
        below = dev.backing
        if below is None and not dev.holes_read_zero:
            yield Extent(st.start, st.length, depth, False, False, False)
            continue
        cut = 0 if below is None else max(0, min(st.length, below.size - st.start))
        if cut:
            yield from _chain_status(below, st.start, cut, depth + 1, first)
        if cut < st.length:  # nothing below answers: zeros, at this depth (with any reserved host offset)
            host = None if st.offset is None else st.offset + cut
            yield Extent(st.start + cut, st.length - cut, depth, False, dev.holes_read_zero, False, host,
                         st.filename if host is not None else None)


def status_at(top: BlockDevice, offset: int, length: int) -> Extent:
    """Status of the first run at ``offset`` in the chain (QEMU's get_block_status loop)."""
    return next(_chain_status(top, offset, length, 0, first=True))


def is_allocated(dev: BlockDevice, offset: int, length: int) -> tuple[bool, int]:
    """QEMU's bdrv_is_allocated of ``dev`` alone: (allocated, length of the run with that status)."""
    first = next(iter(dev.layer_status(offset, length, max_extents=1)))
    return first.data or first.zero, first.length


def is_allocated_above(top: BlockDevice | None, base: BlockDevice | None, offset: int,
                       length: int) -> tuple[bool, int]:
    """QEMU's bdrv_is_allocated_above(top, base): allocated in any layer from ``top`` down to,
    not including, ``base``; the run is cut where any layer's status changes (or it ends).

    A layer below ``top`` that ends before ``offset`` counts as allocated there: its synthesized
    zeros hide everything further down (QEMU's common_block_status_above)."""
    n = length
    dev = top
    while dev is not None and dev is not base:
        if offset >= dev.size:
            if dev is not top:
                return True, n
            dev = dev.backing
            continue
        alloc, run = is_allocated(dev, offset, min(n, dev.size - offset))
        if alloc:
            return True, run
        n = min(n, run)
        dev = dev.backing
    return False, n
