"""The qcow2 driver: a BlockDevice over the engine in qcowpy.qcow2."""
from __future__ import annotations

from typing import Iterator

from ..format import bitmaps as B
from ..format import constants as C
from ..hostfile import data_or_hole
from ..qcow2 import snapshot as sn
from ..qcow2.bitmaps import BitmapError
from ..qcow2.image import COMPRESSED, DATA, ZERO, Qcow2Image
from ..qcow2.resize import make_empty, resize
from ..format.snapshot import Snapshot
from .device import BitmapInfo, BlockDevice, FormatInfo, LayerStatus


class Qcow2Device(BlockDevice):
    format = "qcow2"

    def __init__(self, image: Qcow2Image, filename: str):
        self.image = image
        self.filename = filename
        self.read_only = not image.writable
        self.preadinto = image.preadinto  # type: ignore[method-assign]  # the hot path of device models: no extra frame

    def attach_backing(self, backing: BlockDevice) -> None:
        self.backing = backing
        self.image.backing = backing

    @property
    def size(self) -> int:
        return self.image.size

    @property
    def has_zero_init(self) -> bool:  # type: ignore[override]
        """False for an encrypted image whose L2 tables are preallocated: its data clusters
        decrypt to noise (QEMU's qcow2_has_zero_init looks at the first L1 entry)."""
        meta = self.image.meta
        return not (self.image.crypto is not None and meta.l1 and meta.l1[0])

    def pread(self, length: int, offset: int) -> bytes:
        return self.image.pread(length, offset)

    def preadinto(self, buf: bytearray | memoryview, offset: int) -> None:
        self.image.preadinto(buf, offset)

    def preadv(self, bufs: list[memoryview], offset: int) -> None:
        self.image.preadv(bufs, offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.image.pwrite(data, offset)

    def write_compressed(self, data: bytes, offset: int) -> None:
        self.image.write_compressed(data, offset)

    def write_compressed_many(self, items: list[tuple[bytes, int]]) -> None:
        self.image.write_compressed_many(items)

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        self.image.write_zeroes(length, offset, unmap=unmap)

    def discard(self, length: int, offset: int) -> None:
        self.image.discard(length, offset)

    def flush(self) -> None:
        self.image.flush()

    def truncate(self, size: int, preallocation: str = "off") -> None:
        # QEMU's bdrv_co_truncate: a backing file longer than the old end would show through
        old = self.image.size
        zero_new = size > old and self.backing is not None and self.backing.size > old
        resize(self.image, size, preallocation=preallocation, zero_new=zero_new)

    def layer_status(self, offset: int, length: int, max_extents: int | None = None) -> Iterator[LayerStatus]:
        plain = self.image.crypto is None  # QEMU reports no host offset for encrypted data
        # (nor looks through it at the host file's holes: no BDRV_BLOCK_RECURSE when encrypted)
        prealloc = plain and self.image.metadata_preallocated() and getattr(self.image.data, "fd", -1) >= 0
        name = self.data_filename
        for e in self.image.layer_extents(offset, length, max_extents):
            if prealloc and e.kind == DATA and e.host_offset is not None:
                yield from self._host_holes(e.start, e.length, e.host_offset)
                continue
            yield LayerStatus(e.start, e.length, data=e.kind in (DATA, COMPRESSED), zero=e.kind == ZERO,
                              offset=e.host_offset if plain else None, filename=name)

    @property
    def data_filename(self) -> str:
        """The file that holds the guest data: the external data file, or this image."""
        return self.image.data.path if self.image.external_data else self.filename

    def _host_holes(self, start: int, length: int, host: int) -> Iterator[LayerStatus]:
        """Data clusters of a metadata-preallocated image that sit on holes of the host file read
        as zeros: say so (QEMU's BDRV_BLOCK_RECURSE into the file driver, or the data file)."""
        f = self.image.data
        end, file_size = start + length, f.size()
        pos = start
        while pos < end:
            h = host + pos - start
            is_data, run_end = data_or_hole(f.fd, h, file_size, h + end - pos)
            n = min(run_end - h, end - pos)
            yield LayerStatus(pos, n, data=True, zero=not is_data, offset=h, filename=self.data_filename)
            pos += n

    def _close_self(self) -> None:
        self.image.close()

    # ---- the format's own capabilities
    supports_snapshots = True

    @property
    def cluster_size(self) -> int:
        return self.image.cluster_size

    def format_info(self) -> FormatInfo:
        h = self.image.header
        return FormatInfo(
            cluster_size=h.cluster_size, version=h.version, backing_file=h.backing_file or None,
            backing_format=h.backing_format, dirty=bool(h.incompatible_features & C.INCOMPAT_DIRTY),
            corrupt=bool(h.incompatible_features & C.INCOMPAT_CORRUPT),
            lazy_refcounts=bool(h.compatible_features & C.COMPAT_LAZY_REFCOUNTS), refcount_bits=h.refcount_bits,
            extended_l2=h.extended_l2,
            compression_type="zstd" if h.compression_type == C.COMPRESSION_ZSTD else "zlib",
            data_file=h.data_file, data_file_raw=bool(h.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW),
            encrypt=self.image.crypto.info() if self.image.crypto is not None else None)

    def allocated_size(self) -> int | None:
        try:
            return self.image.file.allocated_bytes()
        except OSError:
            return None

    @property
    def can_write_compressed(self) -> bool:
        return True

    def snapshots(self) -> list[Snapshot]:
        return [e.sn for e in sn.list_snapshots(self.image)]

    def snapshot_create(self, name: str) -> Snapshot:
        return sn.create(self.image, name).sn

    def snapshot_apply(self, key: str) -> None:
        if self.image.bitmaps.items:  # as QEMU's bdrv_snapshot_goto (-EBUSY)
            raise BitmapError("Device has active dirty bitmaps")
        sn.apply(self.image, key)

    def snapshot_delete(self, key: str) -> None:
        sn.delete(self.image, key)

    def snapshot_load_tmp(self, snapshot_id: str | None, name: str | None) -> None:
        sn.load_tmp(self.image, snapshot_id, name)

    def bitmaps(self) -> list[BitmapInfo]:
        """The bitmap directory as it is on disk (what qemu-img info lists)."""
        with self.image.lock:
            return [BitmapInfo(d.name, d.name_size, d.granularity_bits, d.flags & ~B.RESERVED_FLAGS)
                    for d in self.image.bitmaps.disk_entries()]

    @property
    def supports_bitmaps(self) -> bool:  # type: ignore[override]
        return self.image.header.version >= 3

    def bitmap_op(self, op: str, name: bytes, **args) -> None:
        img = self.image
        with img.lock:
            img.require_writable()
            bms = img.bitmaps
            if op == "add":
                bms.add(name, args.get("granularity"), args.get("disabled", False))
            elif op == "remove":
                bms.remove(name)
            elif op == "clear":
                bms.clear(name)
            elif op in ("enable", "disable"):
                bms.set_enabled(name, op == "enable")
            elif op == "merge":
                src = args.get("source") or self
                if not isinstance(src, Qcow2Device):
                    raise BitmapError(f"Dirty bitmap '{args['source_name'].decode('utf-8', 'replace')}' not found")
                bms.merge(name, src.image.bitmaps, args["source_name"])
            else:
                raise ValueError(op)

    def bitmap_dirty(self, name: bytes) -> list[tuple[int, int]]:
        with self.image.lock:
            bms = self.image.bitmaps
            return bms.dirty_runs(bms.lookup(name))

    def change_backing_file(self, name: str | None, fmt: str | None) -> None:
        with self.image.lock:
            self.image.require_writable()
            self.image.meta.change_backing_file(name, fmt)

    def make_empty(self) -> None:
        make_empty(self.image)
