"""``measure``: qemu-img's img_measure — how big an image converted (or created) to a format gets.

qcow2 follows qcow2_measure: the fully allocated size counts the header, every L2 table, the L1
table and the refcount structures that would count them all (found as QEMU's fixed point); the
required size keeps of the data only the clusters the input really holds (zero and unallocated
ranges drop out; everything counts when a backing file is given). raw counts every byte; luks every byte plus its header and key slots.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..block.device import BlockDevice, status_at
from ..block.open import open_image
from ..errors import InvalidArgument, QcowError
from ..block.create import qcow2_size_fits
from ..crypto.luks import header_area_size
from ..crypto.secret import SECRETS
from .options import ParsedOpts, parse_create_options, refcount_bits_error
from .qjson import QDict, dumps_pretty

# formats QEMU knows but cannot measure; anything else is an unknown format to qemu-img
_NO_MEASURE = ("vmdk", "vdi", "vpc", "vhdx", "qed", "qcow", "parallels", "vvfat", "bochs", "cloop", "dmg", "file")


class MeasureError(QcowError):
    pass


@dataclass
class Measure:
    required: int
    fully_allocated: int
    bitmaps: int | None = None  # only when both sides could carry persistent bitmaps


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int) -> int:
    """qcow2_refcount_metadata_size: refcount blocks and table clusters that count ``clusters``
    clusters and themselves (the smallest fixed point)."""
    per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // per_table_cluster)
        n = clusters + blocks + table
        if n == last:
            return (blocks + table) * cluster_size


def qcow2_prealloc_size(total: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """qcow2_calc_prealloc_size: a fully allocated image of ``total`` bytes, metadata included."""
    aligned = _round_up(total, cluster_size)
    l2e = 16 if extended_l2 else 8
    meta = cluster_size                                          # header
    nl2e = _round_up(aligned // cluster_size, cluster_size // l2e)
    meta += nl2e * l2e                                           # L2 tables
    nl1e = _round_up(nl2e * l2e // cluster_size, cluster_size // 8)
    meta += nl1e * 8                                             # L1 table
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def _qcow2_params(opts: ParsedOpts) -> tuple[int, int, int, bool, str, bool]:
    """(cluster size, version, refcount order, extended L2, preallocation, backing) with the checks
    qcow2_measure makes, in its order and words."""
    v = opts.values
    ext = bool(v.get("extended_l2", False))
    cs = int(v.get("cluster_size", 65536))  # type: ignore[call-overload]
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise MeasureError("Cluster size must be a power of two between 512 and 2048k")
    if ext and cs < 16384:
        raise MeasureError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    compat = v.get("compat")
    if compat is None or compat == "1.1":
        version = 3
    elif compat == "0.10":
        version = 2
    else:
        raise MeasureError(f"Invalid compatibility level: '{compat}'")
    bits = int(v.get("refcount_bits", 16))  # type: ignore[call-overload]
    rb_error = refcount_bits_error(bits, version, "compat=1.1")
    if rb_error:
        raise MeasureError(rb_error)
    prealloc = str(v.get("preallocation", "off"))
    if prealloc not in ("off", "metadata", "falloc", "full"):
        raise MeasureError(f"invalid parameter value: {prealloc}")
    return cs, version, bits.bit_length() - 1, ext, prealloc, bool(v.get("backing_file"))


def _luks_area(opts: ParsedOpts, cluster_size: int, prefix: str = "encrypt.") -> int:
    """The clusters a LUKS header and its key slots take (qcow2's ``encrypt.format=luks``, or
    the luks format's own options, ``prefix=""``, in bytes: ``cluster_size`` 1)."""
    if prefix and opts.values.get("encrypt.format") != "luks":
        return 0
    from .encrypt_opts import luks_create_options
    try:
        luks = luks_create_options(opts.values, prefix)
        secret_id = opts.values.get(f"{prefix}key-secret")  # QEMU's dry run looks the secret up
        if secret_id is None:
            raise InvalidArgument(f"Parameter '{prefix}key-secret' is required for cipher")
        SECRETS.passphrase(str(secret_id))
        size = header_area_size(luks)
    except QcowError as e:
        raise MeasureError(str(e)) from None
    return _round_up(size, cluster_size)


def _bitmaps_size(dev: BlockDevice, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size for the input's persistent bitmaps."""
    total = dir_size = 0
    for bm in dev.bitmaps():
        nbytes = -(-(-(-dev.size // (1 << bm.granularity_bits))) // 8)  # one bit per granule
        clusters = -(-nbytes // cluster_size)
        total += clusters * cluster_size + _round_up(clusters * 8, cluster_size)  # data + bitmap table
        dir_size += _round_up(_DIR_ENTRY_SIZE + bm.name_size, 8)  # the entry the new image's directory needs
    return total + _round_up(dir_size, cluster_size)


_DIR_ENTRY_SIZE = 24  # a bitmap directory entry's fixed part


def measure(out_fmt: str, options: str | None, filename: str | None = None, fmt: str | None = None,
            size: int | None = None, force_share: bool = False,
            load_snapshot: "Callable[[BlockDevice], None] | None" = None) -> Measure:
    """qemu-img measure; ``load_snapshot`` (``-l``) makes the input show an internal snapshot."""
    if out_fmt in _NO_MEASURE:
        raise MeasureError(f"Block driver '{out_fmt}' does not support size measurement")
    try:
        opts = parse_create_options(out_fmt, options, "file:")  # QEMU adds the file driver's options
    except InvalidArgument as e:
        if "Unknown file format" in str(e):
            raise MeasureError(str(e)) from None
        raise MeasureError(f"{e}\nInvalid options for file format '{out_fmt}'") from None
    try:
        dev = open_image(filename, "r", fmt, force_share=force_share) if filename else None
    except QcowError as e:
        raise MeasureError(f"Could not open '{filename}': {e}") from None
    try:
        if dev is not None and load_snapshot is not None:
            try:
                load_snapshot(dev)
            except QcowError as e:
                raise MeasureError(f"Failed to load snapshot: {e}") from None
        virtual = size if size is not None else int(opts.values.get("size", 0))  # type: ignore[call-overload]
        if out_fmt == "raw":
            total = dev.size if dev is not None else _round_up(virtual, 512)
            return Measure(total, total)
        if out_fmt == "luks":  # every payload byte is stored (encrypted), allocated or not
            total = _luks_area(opts, 1, prefix="") + (dev.size if dev is not None else virtual)
            return Measure(total, total)
        cs, version, order, ext, prealloc, backing = _qcow2_params(opts)
        virtual = _round_up(virtual, cs)
        if not qcow2_size_fits(virtual, cs, ext):
            raise MeasureError("The image size is too large (try using a larger cluster size)")
        required = 0
        if dev is not None:
            ssize = dev.size
            virtual = _round_up(ssize, cs)
            if backing:
                required = virtual
            else:
                offset = 0
                while offset < ssize:
                    ext_ = status_at(dev, offset, ssize - offset)
                    pnum = ext_.length
                    if ext_.zero or not ext_.present:
                        pass  # zero or unallocated everywhere: nothing to store
                    elif ext_.data:
                        pnum = _round_up(offset + pnum, cs) - offset  # to the end of its cluster
                        required += offset % cs + pnum
                    offset += pnum
        if prealloc in ("full", "falloc"):
            required = virtual
        full = qcow2_prealloc_size(virtual, cs, order, ext) + _luks_area(opts, cs)
        result = Measure(full - virtual + required, full)
        if version >= 3 and dev is not None and dev.supports_bitmaps:  # QEMU: the input can hold bitmaps
            result.bitmaps = _bitmaps_size(dev, cs)
        return result
    finally:
        if dev is not None:
            dev.close()


def render(m: Measure, output: str) -> str:
    if output == "json":
        d = QDict()
        if m.bitmaps is not None:
            d["bitmaps"] = m.bitmaps
        d["required"] = m.required
        d["fully-allocated"] = m.fully_allocated
        return dumps_pretty(d) + "\n"
    text = f"required size: {m.required}\nfully allocated size: {m.fully_allocated}\n"
    if m.bitmaps is not None:
        text += f"bitmaps size: {m.bitmaps}\n"
    return text
