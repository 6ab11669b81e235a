"""Create qcow2 images with the layout qemu-img uses.

Cluster 0 holds the header, cluster 1 the refcount table, cluster 2 the first refcount block;
the L1 table (exactly as long as the virtual size needs) comes next. An empty 20 GiB image is
therefore 3 clusters plus 320 bytes, byte for byte what qemu-img writes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import InvalidArgument
from ..format import constants as C
from ..format.header import Header, feature_table_bytes, pack_header
from ..format.refcount import set_refcount
from ..hostfile import HostFile, open_host_file, set_create_hints
from .encryption import set_up
from .image import Qcow2Image
from .resize import preallocate, resize

PREALLOC_MODES = ("off", "metadata", "falloc", "full")

if TYPE_CHECKING:
    from ..crypto.luks import CreateOptions as LuksCreateOptions


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
    data_file: str | None = None  # external data file (created, or truncated, here)
    data_file_raw: bool = False
    nocow: bool = False  # the file driver's creation hints (hostfile.set_create_hints)
    extent_size_hint: int | None = None
    warn: "Callable[[str], None] | None" = None  # where a hint that could not be set is reported

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
        if self.data_file_raw and not self.data_file:
            raise InvalidArgument("data-file-raw requires data-file")
        if self.data_file_raw and self.backing_file:
            raise InvalidArgument("Backing file and data-file-raw cannot be used at the same time")
        if self.data_file and self.version < 3:
            raise InvalidArgument("External data files are only supported with compatibility level 1.1 "
                                  "and above (use version=v3 or greater)")


@dataclass
class EncryptSpec:
    """``encrypt.*`` creation options with the passphrase resolved: ``format`` "luks" or "aes"."""

    format: str
    passphrase: bytes
    luks: LuksCreateOptions | None = None


def _file_hints(f, nocow: bool, extent_size_hint: int | None, warn: "Callable[[str], None] | None") -> None:
    if getattr(f, "fd", -1) >= 0:  # a local file (rbd: and other protocols have no such hints)
        message = set_create_hints(f.fd, nocow, extent_size_hint)
        if message and warn is not None:
            warn(message)


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
    if opts.data_file:
        h.incompatible_features |= C.INCOMPAT_DATA_FILE
        h.set_extension(C.EXT_DATA_FILE, opts.data_file.encode("utf-8", "surrogateescape"))
        if opts.data_file_raw:
            h.autoclear_features |= C.AUTOCLEAR_DATA_FILE_RAW
        HostFile(opts.data_file, writable=True, create=True).close()  # as QEMU: a new, empty file
    head = pack_header(h)
    reftable = (2 * cs).to_bytes(8, "big")
    block = bytearray(cs)
    for i in range(3):
        set_refcount(block, i, order, 1)
    f = open_host_file(path, writable=True, create=True)
    try:
        _file_hints(f, opts.nocow, opts.extent_size_hint, opts.warn)
        f.pwrite(head + bytes(cs - len(head)) + reftable + bytes(cs - 8) + block, 0)
    finally:
        f.close()
    with Qcow2Image.open(path, writable=True, data_file=opts.data_file) as img:
        prealloc = "metadata" if opts.data_file_raw and opts.preallocation == "off" else opts.preallocation
        if img.external_data:  # QEMU's truncate: the data file follows the size (and preallocation)
            resize(img, size, exact_l1=True, preallocation=prealloc)
        else:
            resize(img, size, exact_l1=True)
            if prealloc != "off":
                preallocate(img, prealloc)
        if opts.encrypt is not None:
            set_up(img, opts.encrypt.format, opts.encrypt.passphrase, opts.encrypt.luks)
