"""Create qcow2 images with the layout qemu-img uses.

Cluster 0 holds the header, cluster 1 the refcount table, cluster 2 the first refcount block;
the L1 table (exactly as long as the virtual size needs) comes next. An empty 20 GiB image is
therefore 3 clusters plus 320 bytes, byte for byte what qemu-img writes.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..crypto.luks import CreateOptions as LuksCreateOptions
from ..errors import InvalidArgument
from ..format import constants as C
from ..format.header import Header, feature_table_bytes, pack_header
from ..format.refcount import set_refcount
from ..hostfile import open_host_file
from .encryption import set_up
from .image import Qcow2Image
from .resize import preallocate, resize

PREALLOC_MODES = ("off", "metadata", "falloc", "full")


@dataclass
class Qcow2Options:
    """Creation options, named and validated as qemu-img's ``-o`` options are."""

    size: int
    cluster_size: int = C.DEFAULT_CLUSTER_SIZE
    compat: str = "1.1"
    refcount_bits: int = 16
    compression_type: str = "zlib"
    lazy_refcounts: bool = False
    preallocation: str = "off"
    extended_l2: bool = False
    backing_file: str | None = None
    backing_fmt: str | None = None
    encrypt: "EncryptSpec | None" = None  # encrypt the new image (set up last, as QEMU does)

    @property
    def version(self) -> int:
        return 2 if self.compat in ("0.10", "v2") else 3

    def validate(self) -> None:
        cs = self.cluster_size
        if self.compat not in ("0.10", "1.1", "v2", "v3"):
            raise InvalidArgument(f"Invalid compatibility level: '{self.compat}'")
        if cs & (cs - 1) or not (1 << C.MIN_CLUSTER_BITS) <= cs <= (1 << C.MAX_CLUSTER_BITS):
            raise InvalidArgument("Cluster size must be a power of two between 512 and 2048k")
        if self.refcount_bits < 1 or self.refcount_bits > 64 or self.refcount_bits & (self.refcount_bits - 1):
            raise InvalidArgument("Refcount width must be a power of two and may not exceed 64 bits")
        if self.version == 2 and self.refcount_bits != 16:
            raise InvalidArgument("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                                  "(use compat=1.1 or greater)")
        if self.compression_type not in ("zlib", "zstd"):
            raise InvalidArgument(f"Invalid parameter '{self.compression_type}'")
        if self.version == 2 and self.compression_type != "zlib":
            raise InvalidArgument("Non-zlib compression type is only supported with compatibility level 1.1 "
                                  "and above (use compat=1.1 or greater)")
        if self.version == 2 and self.lazy_refcounts:
            raise InvalidArgument("Lazy refcounts only supported with compatibility level 1.1 and above "
                                  "(use compat=1.1 or greater)")
        if self.extended_l2:
            if self.version == 2:
                raise InvalidArgument("Extended L2 entries are only supported with compatibility level 1.1 and above")
            if cs < 16384:
                raise InvalidArgument("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
        if self.preallocation not in PREALLOC_MODES:
            raise InvalidArgument(f"Invalid parameter '{self.preallocation}'")
        if self.backing_file and self.preallocation != "off" and not self.extended_l2:
            raise InvalidArgument("Backing file and preallocation can only be used at the same time if "
                                  "extended_l2 is on")  # QEMU's rule for non-extended-L2 images
        if self.size < 0:
            raise InvalidArgument("Image size must be a non-negative number")
        if self.backing_fmt and not self.backing_file:
            raise InvalidArgument("Backing format cannot be used without backing file")


@dataclass
class EncryptSpec:
    """``encrypt.*`` creation options with the passphrase resolved: ``format`` "luks" or "aes"."""

    format: str
    passphrase: bytes
    luks: LuksCreateOptions | None = None


def create_qcow2(path: str, opts: Qcow2Options) -> None:
    """Write a new, empty qcow2 image at ``path`` (truncating any file there)."""
    opts.validate()
    cs = opts.cluster_size
    cbits = cs.bit_length() - 1
    size = (opts.size + 511) & ~511
    order = opts.refcount_bits.bit_length() - 1
    h = Header(version=opts.version, cluster_bits=cbits, size=0, refcount_table_offset=cs,
               refcount_table_clusters=1, refcount_order=order if opts.version == 3 else 4,
               header_length=C.V3_HEADER_SIZE if opts.version == 3 else C.V2_HEADER_SIZE)
    if opts.compression_type == "zstd":
        h.compression_type = C.COMPRESSION_ZSTD
        h.incompatible_features |= C.INCOMPAT_COMPRESSION
    if opts.extended_l2:
        h.incompatible_features |= C.INCOMPAT_EXTL2
    if opts.lazy_refcounts:
        h.compatible_features |= C.COMPAT_LAZY_REFCOUNTS
    if opts.backing_fmt:
        h.set_extension(C.EXT_BACKING_FORMAT, opts.backing_fmt.encode())
    if opts.version == 3 and cs > 4096:
        h.set_extension(C.EXT_FEATURE_TABLE, feature_table_bytes())
    h.backing_file = opts.backing_file or None
    head = pack_header(h)
    reftable = (2 * cs).to_bytes(8, "big")
    block = bytearray(cs)
    for i in range(3):
        set_refcount(block, i, order, 1)
    f = open_host_file(path, writable=True, create=True)
    try:
        f.pwrite(head + bytes(cs - len(head)) + reftable + bytes(cs - 8) + block, 0)
    finally:
        f.close()
    with Qcow2Image.open(path, writable=True) as img:
        resize(img, size, exact_l1=True)
        if opts.preallocation != "off":
            preallocate(img, opts.preallocation)
        if opts.encrypt is not None:
            set_up(img, opts.encrypt.format, opts.encrypt.passphrase, opts.encrypt.luks)
