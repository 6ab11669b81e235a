"""Numbers fixed by the qcow2 specification and the limits QEMU enforces on them."""
from __future__ import annotations

MAGIC = b"QFI\xfb"

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_SIZE = 65536

V2_HEADER_SIZE = 72
V3_MIN_HEADER_SIZE = 104
V3_HEADER_SIZE = 112  # what QEMU writes: 104 + compression_type + 7 bytes padding

# Limits QEMU applies so a hostile image costs bounded time and memory.
INT_MAX = (1 << 31) - 1  # C int limits QEMU applies to counts it keeps in an int
MAX_L1_SIZE_BYTES = 32 * 1024 * 1024
MAX_REFTABLE_SIZE_BYTES = 8 * 1024 * 1024
MAX_SNAPSHOTS = 65536
MAX_BACKING_FILE_NAME = 1023
MAX_CLUSTER_OFFSET = (1 << 56) - 1

# Incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2

# Compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
COMPAT_KNOWN = COMPAT_LAZY_REFCOUNTS

# Autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

# (type, bit, name) as QEMU writes them into the feature name table.
FEATURE_NAMES: tuple[tuple[int, int, str], ...] = (
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
)

# Header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FDE = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

# L1/L2 entry bits
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00  # refcount table entries: QEMU keeps every high bit
REFT_RESERVED_MASK = 0x1FF
L2E_STD_RESERVED_MASK = 0x3F000000000001FE
COMPRESSED_SECTOR_SIZE = 512
SUBCLUSTERS_PER_CLUSTER = 32
SUBCLUSTER_BITS = 5  # log2(SUBCLUSTERS_PER_CLUSTER)
L2_BITMAP_ALL_ALLOC = (1 << 32) - 1  # extended L2 bitmap: every subcluster allocated
L2_BITMAP_ALL_ZEROES = L2_BITMAP_ALL_ALLOC << 32  # ... every subcluster reads zeros
MAX_FILE_OFFSET = (1 << 63) - 1  # host offsets are int64 in QEMU (and in os.pread)

# The LUKS1 magic (crypto/luks.py): probing recognises it without loading the crypto code
LUKS_MAGIC = b"LUKS\xba\xbe"
