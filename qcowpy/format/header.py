"""qcow2 header, header extensions and the backing file name: bytes in, values out, and back."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from ..errors import CorruptImage, FormatError, UnsupportedFeature
from . import constants as C

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
_V3 = struct.Struct(">QQQII")  # 32 more bytes -> 104
assert _V2.size == C.V2_HEADER_SIZE and _V2.size + _V3.size == C.V3_MIN_HEADER_SIZE


@dataclass
class Extension:
    """One header extension, kept as raw bytes so unknown ones survive a rewrite."""

    type: int
    data: bytes


@dataclass
class Header:
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = C.V3_HEADER_SIZE
    compression_type: int = C.COMPRESSION_ZLIB
    extensions: list[Extension] = field(default_factory=list)
    backing_file: str | None = None
    unknown_header_fields: bytes = b""

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & C.INCOMPAT_EXTL2)

    def find_extension(self, ext_type: int) -> Extension | None:
        """The extension of this type; of several, the last (QEMU reads them in order, so the
        last one it reads wins)."""
        found = None
        for ext in self.extensions:
            if ext.type == ext_type:
                found = ext
        return found

    def set_extension(self, ext_type: int, data: bytes | None) -> None:
        """Replace (or with None remove) the extension of this type — every copy of it — keeping
        the order of the rest."""
        first = next((i for i, e in enumerate(self.extensions) if e.type == ext_type), None)
        self.extensions = [e for e in self.extensions if e.type != ext_type]
        if data is not None:
            self.extensions.insert(len(self.extensions) if first is None else first, Extension(ext_type, data))

    @property
    def backing_format(self) -> str | None:
        ext = self.find_extension(C.EXT_BACKING_FORMAT)
        return ext.data.decode("utf-8", "replace") if ext else None

    @property
    def data_file(self) -> str | None:
        ext = self.find_extension(C.EXT_DATA_FILE)
        return ext.data.decode("utf-8", "replace") if ext else None

    def copy(self) -> "Header":
        return replace(self, extensions=[Extension(e.type, e.data) for e in self.extensions])


# The fixed header fields in on-disk order, with their struct codes (the layout of _V2 + _V3).
_FIELDS = (("magic", "4s"), ("version", "I"), ("backing_file_offset", "Q"), ("backing_file_size", "I"),
           ("cluster_bits", "I"), ("size", "Q"), ("crypt_method", "I"), ("l1_size", "I"),
           ("l1_table_offset", "Q"), ("refcount_table_offset", "Q"), ("refcount_table_clusters", "I"),
           ("nb_snapshots", "I"), ("snapshots_offset", "Q"), ("incompatible_features", "Q"),
           ("compatible_features", "Q"), ("autoclear_features", "Q"), ("refcount_order", "I"),
           ("header_length", "I"))
_FIELD_AT: dict[str, tuple[int, int]] = {}  # name -> (index in _FIELDS, byte offset)
_pos = 0
for _i, (_name, _code) in enumerate(_FIELDS):
    _FIELD_AT[_name] = (_i, _pos)
    _pos += struct.calcsize(">" + _code)
assert _pos == C.V3_MIN_HEADER_SIZE


def field_patch(h: Header, first: str, last: str | None = None) -> tuple[int, bytes]:
    """(offset, bytes) of the adjacent header fields ``first``..``last`` as ``h`` holds them: the
    engine updates single fields in place (one sector, so the update is atomic) by name."""
    i, offset = _FIELD_AT[first]
    j = _FIELD_AT[last or first][0]
    if j < i:
        raise ValueError(f"header field {last} comes before {first}")
    names = _FIELDS[i:j + 1]
    values = [C.MAGIC if n == "magic" else getattr(h, n) for n, _ in names]
    return offset, struct.pack(">" + "".join(code for _, code in names), *values)


def pack_header_cluster(h: Header) -> bytes:
    """The whole header cluster: header, extensions and backing name, zero-padded."""
    data = pack_header(h)
    return data + bytes(h.cluster_size - len(data))


def feature_table_bytes() -> bytes:
    """The feature name table extension body QEMU writes (48 bytes per entry)."""
    out = bytearray()
    for ftype, bit, name in C.FEATURE_NAMES:
        out += struct.pack(">BB46s", ftype, bit, name.encode())
    return bytes(out)


def parse_feature_table(data: bytes) -> list[tuple[int, int, str]]:
    """(type, bit, name) entries in table order, up to the first without a name; a short last
    entry counts as zero-padded, as QEMU reads the extension into a zeroed buffer."""
    entries = []
    for i in range(0, len(data), 48):
        ftype, bit, raw = struct.unpack(">BB46s", data[i:i + 48].ljust(48, b"\0"))
        name = raw.split(b"\0", 1)[0]
        if not name:
            break
        entries.append((ftype, bit, name.decode("utf-8", "replace")))
    return entries


def unknown_incompatible_message(header: Header) -> str | None:
    """Name the unknown incompatible bits the way QEMU does: the image's own feature table names
    them in table order, the bits it does not name follow as one hexadecimal mask."""
    unknown = header.incompatible_features & ~C.INCOMPAT_KNOWN
    if not unknown:
        return None
    ext = header.find_extension(C.EXT_FEATURE_TABLE)
    parts = []
    for ftype, bit, name in parse_feature_table(ext.data) if ext else []:
        if ftype == 0 and bit < 64 and unknown & (1 << bit):
            parts.append(name)
            unknown &= ~(1 << bit)
    if unknown:
        parts.append(f"Unknown incompatible feature: {unknown:x}")
    return "Unsupported qcow2 feature(s): " + ", ".join(parts)


def parse_header(buf: bytes, file_size: int | None = None) -> Header:
    """Decode the header, its extensions and the backing file name from the image's first bytes.

    ``buf`` must hold at least the first cluster (or the whole file if shorter). Every length
    and offset is range-checked so a hostile header fails cleanly.
    """
    if len(buf) < C.V2_HEADER_SIZE:
        if buf[:4] == C.MAGIC:
            raise CorruptImage("qcow2 header is truncated")
        raise FormatError("Image is not in qcow2 format")
    (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = _V2.unpack_from(buf, 0)
    if magic != C.MAGIC:
        raise FormatError("Image is not in qcow2 format")
    if version not in (2, 3):
        raise UnsupportedFeature(f"Unsupported qcow2 version {version}")
    if not C.MIN_CLUSTER_BITS <= cbits <= C.MAX_CLUSTER_BITS:
        raise CorruptImage(f"Unsupported cluster size: 2^{cbits}")
    h = Header(version=version, backing_file_offset=bfo, backing_file_size=bfs, cluster_bits=cbits,
               size=size, crypt_method=crypt, l1_size=l1_size, l1_table_offset=l1_off,
               refcount_table_offset=rt_off, refcount_table_clusters=rt_clusters,
               nb_snapshots=nb_snap, snapshots_offset=snap_off)
    csize = 1 << cbits
    if version == 2:
        h.header_length = C.V2_HEADER_SIZE
        h.refcount_order = 4
    else:
        if len(buf) < C.V3_MIN_HEADER_SIZE:
            raise CorruptImage("qcow2 header is truncated")
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
         h.header_length) = _V3.unpack_from(buf, C.V2_HEADER_SIZE)
        if h.header_length < C.V3_MIN_HEADER_SIZE:
            raise CorruptImage("qcow2 header too short")
        if h.header_length > csize:
            raise CorruptImage("qcow2 header exceeds cluster size")
        if h.header_length > len(buf):
            raise CorruptImage("qcow2 header is truncated")
        if h.refcount_order > 6:
            raise CorruptImage("Reference count entry width too large; may not exceed 64 bits")
        if h.header_length > C.V3_MIN_HEADER_SIZE:
            h.compression_type = buf[C.V3_MIN_HEADER_SIZE]
    if h.compression_type not in C.COMPRESSION_NAMES:
        raise UnsupportedFeature(f"Unknown compression type {h.compression_type}")
    if h.compression_type != C.COMPRESSION_ZLIB and not h.incompatible_features & C.INCOMPAT_COMPRESSION:
        raise CorruptImage("Compression type incompatible feature bit must be set for non-zlib compression")
    if h.compression_type == C.COMPRESSION_ZLIB and h.incompatible_features & C.INCOMPAT_COMPRESSION:
        raise CorruptImage("Compression type incompatible feature bit must not be set for zlib compression")

    # Header extensions live between the header and the backing file name (or the cluster end).
    ext_end = min(csize, len(buf))
    if bfo and bfo < ext_end:
        ext_end = bfo
    if h.header_length > C.V3_HEADER_SIZE:
        h.unknown_header_fields = bytes(buf[C.V3_HEADER_SIZE:h.header_length])
    h.extensions = _parse_extensions(buf, (h.header_length + 7) & ~7, ext_end)
    if bfo:
        if bfs > C.MAX_BACKING_FILE_NAME or bfs > csize:
            raise CorruptImage("Backing file name too long")
        if bfo + bfs > csize or bfo + bfs > len(buf):
            raise CorruptImage("Backing file name lies outside the header cluster")
        h.backing_file = buf[bfo:bfo + bfs].decode("utf-8", "surrogateescape")
    return h


def _parse_extensions(buf: bytes, start: int, end: int) -> list[Extension]:
    exts: list[Extension] = []
    off = start
    while True:
        if off + 8 > end:
            # QEMU tolerates a missing end marker only at the exact end of the area
            if off >= end:
                return exts
            raise CorruptImage("Invalid header extension: header extension area overflows")
        etype, elen = struct.unpack_from(">II", buf, off)
        off += 8
        if etype == C.EXT_END:
            return exts
        if elen > end - off:
            raise CorruptImage(f"Header extension 0x{etype:08x} exceeds the header cluster")
        exts.append(Extension(etype, bytes(buf[off:off + elen])))
        off += (elen + 7) & ~7


_KNOWN_ORDER = (C.EXT_BACKING_FORMAT, C.EXT_DATA_FILE, C.EXT_FDE, C.EXT_FEATURE_TABLE, C.EXT_BITMAPS)


def _canonical_order(exts: list[Extension]) -> list[Extension]:
    """QEMU writes the known extensions in a fixed order, each once (the last copy it read), then
    the unknown ones as it found them."""
    last = {e.type: e for e in exts if e.type in _KNOWN_ORDER}
    known = sorted(last.values(), key=lambda e: _KNOWN_ORDER.index(e.type))
    return known + [e for e in exts if e.type not in _KNOWN_ORDER]


def pack_header(h: Header) -> bytes:
    """Encode header + extensions + backing name into the bytes that go at offset 0.

    Sets ``backing_file_offset``/``size`` from the layout, as QEMU does when it rewrites the header.
    """
    if h.version == 2:
        body = bytearray(C.V2_HEADER_SIZE)
    else:
        body = bytearray(C.V3_HEADER_SIZE)
        h.header_length = C.V3_HEADER_SIZE + len(h.unknown_header_fields)
        _V3.pack_into(body, C.V2_HEADER_SIZE, h.incompatible_features, h.compatible_features,
                      h.autoclear_features, h.refcount_order, h.header_length)
        body[C.V3_MIN_HEADER_SIZE] = h.compression_type
        body += h.unknown_header_fields
        body += bytes(-len(body) % 8)
    for ext in _canonical_order(h.extensions):
        body += struct.pack(">II", ext.type, len(ext.data)) + ext.data + bytes(-len(ext.data) % 8)
    body += bytes(8)  # end of extensions
    if h.backing_file:
        name = h.backing_file.encode("utf-8", "surrogateescape")
        h.backing_file_offset, h.backing_file_size = len(body), len(name)
        body += name
    else:
        h.backing_file_offset, h.backing_file_size = 0, 0
    if len(body) > h.cluster_size:
        raise UnsupportedFeature("Header, extensions and backing file name do not fit in one cluster")
    _V2.pack_into(body, 0, C.MAGIC, h.version, h.backing_file_offset, h.backing_file_size,
                  h.cluster_bits, h.size, h.crypt_method, h.l1_size, h.l1_table_offset,
                  h.refcount_table_offset, h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset)
    return bytes(body)
