"""The shared state of a qcow2 check: results, the refcounts as stored, and the context every
part of the check works in (the file, the header, messages, overlap-checked repair writes).

check.py runs the refcount check and check_snapshots.py the snapshot table's; both build on this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import QcowError
from ..format import constants as C
from ..format.bitmaps import directory_location
from ..format.entries import unpack_table
from ..format.header import Header, field_patch
from ..format.refcount import decode_block, encode_block, max_refcount
from ..format.snapshot import Snapshot
from ..hostfile import HostFile
from .overlap import Layout, find_overlap, overlap_message

FIX_LEAKS = 1
FIX_ERRORS = 2

_CHECK_FRAG_INFO = 2


@dataclass
class CheckResult:
    """The counters of QEMU's BdrvCheckResult plus the messages printed while checking."""

    check_errors: int = 0
    corruptions: int = 0
    leaks: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """No corruptions and no internal errors (leaks are allowed)."""
        return not self.corruptions and not self.check_errors

    def add(self, other: "CheckResult", with_frag: bool) -> None:
        self.check_errors += other.check_errors
        self.corruptions += other.corruptions
        self.leaks += other.leaks
        self.corruptions_fixed += other.corruptions_fixed
        self.leaks_fixed += other.leaks_fixed
        self.messages += other.messages
        if with_frag:
            self.image_end_offset = other.image_end_offset
            self.total_clusters = other.total_clusters
            self.allocated_clusters = other.allocated_clusters
            self.fragmented_clusters = other.fragmented_clusters
            self.compressed_clusters = other.compressed_clusters


class Hint(str):
    """A hint line among the error reports of a failed check: printed without the program name."""



def write_fields(file, h: Header, first: str, last: str | None = None) -> None:
    """Write header fields ``first``..``last`` in place, as ``h`` holds them (repairs write
    the file directly: the image may be one the engine refuses to open)."""
    offset, data = field_patch(h, first, last)
    file.pwrite(data, offset)


class CheckAbort(Exception):
    """An I/O-level failure that ends the check (QEMU returns -errno).

    ``lines`` are error reports printed before "Check failed" (with the program name prefix).
    """

    def __init__(self, message: str, lines: tuple[str, ...] = ()):
        super().__init__(message)
        self.lines = list(lines)



class CheckFailed(QcowError):
    """The check could not complete (exit status 1); ``result`` holds what was counted so far."""

    def __init__(self, message: str, result: CheckResult, lines: list[str] | None = None):
        super().__init__(message)
        self.result = result
        self.lines = lines or []


def copy_result(res: CheckResult) -> CheckResult:
    c = CheckResult(**{k: v for k, v in res.__dict__.items() if k != "messages"})
    c.messages = list(res.messages)
    return c


class OnDiskRefcounts:
    """The refcounts as stored in the image (reftable + refcount blocks), read and patched."""

    def __init__(self, file: HostFile, header: Header, reftable: list[int]):
        self.file = file
        self.cs = header.cluster_size
        self.order = header.refcount_order
        self.per_block_bits = header.cluster_bits + 3 - self.order
        self.per_block = 1 << self.per_block_bits
        self.reftable = reftable
        self.blocks: dict[int, list[int]] = {}
        self.dirty: set[int] = set()

    def _block(self, index: int) -> tuple[int, list[int]] | None:
        if index >= len(self.reftable):
            return None
        off = self.reftable[index] & C.REFT_OFFSET_MASK
        if not off:
            return None
        if off & (self.cs - 1) or off + self.cs > C.MAX_FILE_OFFSET:
            raise CheckAbort("Input/output error")  # QEMU's read fails on such an offset
        blk = self.blocks.get(off)
        if blk is None:
            if len(self.blocks) > 256 and not self.dirty:
                self.blocks.clear()
            blk = decode_block(self.file.pread(self.cs, off), self.order, self.per_block)
            self.blocks[off] = blk
        return off, blk

    def get(self, cluster: int) -> int:
        got = self._block(cluster >> self.per_block_bits)
        return got[1][cluster & (self.per_block - 1)] if got else 0

    def block_values(self, index: int) -> list[int] | None:
        got = self._block(index)
        return got[1] if got else None

    def set(self, cluster: int, value: int) -> bool:
        got = self._block(cluster >> self.per_block_bits)
        if not got:
            return False
        got[1][cluster & (self.per_block - 1)] = value
        self.dirty.add(got[0])
        return True

    def write_back(self) -> None:
        for off in sorted(self.dirty):
            self.file.pwrite(encode_block(self.blocks[off], self.order, self.cs), off)
        self.dirty.clear()

    def forget(self) -> None:
        self.blocks.clear()
        self.dirty.clear()



class CheckContext:
    """What every part of the check shares."""

    def __init__(self, file: HostFile, header: Header, log: Callable[[str], None]):
        self.file = file
        self.h = header
        self.cs = header.cluster_size
        self.cbits = header.cluster_bits
        self.extended = header.extended_l2
        self.l2_entries = self.cs // (16 if self.extended else 8)
        self.order = header.refcount_order
        self.rmax = max_refcount(self.order)
        self.log = log
        self.snapshots: list[Snapshot] = []
        self.sn_raw: list[tuple[bytes, bytes]] = []  # id and name bytes, for rewriting the table
        self.snapshots_size = 0
        self.file_len = file.size()
        self._load_reftable()

    # ---------------------------------------------------------------- setup
    def _load_reftable(self) -> None:
        h = self.h
        n = h.refcount_table_clusters * self.cs // 8
        raw = self.file.pread(n * 8, h.refcount_table_offset) if n else b""
        self.ondisk = OnDiskRefcounts(self.file, h, unpack_table(raw))

    def msg(self, res: CheckResult, text: str) -> None:
        res.messages.append(text)
        self.log(text)

    # ---------------------------------------------------------------- overlap-checked repair writes
    def _current_layout(self) -> Layout:
        h = self.h
        l1 = unpack_table(self.file.pread(h.l1_size * 8, h.l1_table_offset)) if h.l1_size else []
        return Layout(self.cs, h.l1_table_offset, l1, h.refcount_table_offset, list(self.ondisk.reftable),
                      h.snapshots_offset, self.snapshots_size,
                      [(s.l1_table_offset, s.l1_size) for s in self.snapshots], directory_location(h))

    def _guarded_check(self, offset: int, size: int, ignore: int, what: str | None = None) -> None:
        """Overlap check for a repair write against the image's current metadata (as QEMU checks its
        in-memory state before every repair write); an overlap marks the image corrupt and raises."""
        self._layout = self._current_layout()
        self._overlap_check(offset, size, what, ignore)

    def _overlap_check(self, offset: int, size: int, what: str | None, ignore: int = 0) -> None:
        kind = find_overlap(self._layout, offset, size, ignore)
        if not kind:
            return
        self.log(f"qcow2: Marking image as corrupt: {overlap_message(kind)}; further corruption events "
                 "will be suppressed")
        self.h.incompatible_features |= C.INCOMPAT_CORRUPT
        write_fields(self.file, self.h, "incompatible_features")
        self.file.flush()
        raise CheckAbort("Input/output error", (f"{what}: Input/output error",) if what else ())

