"""Header v2/v3 decoding and encoding against headers qemu-img writes, feature bits, extensions."""
from __future__ import annotations

import shutil
import struct

import pytest

import qcowpy
from qcowpy.errors import CorruptImage, FormatError, QcowError, UnsupportedFeature
from qcowpy.format import constants as C
from qcowpy.format.header import (Extension, Header, pack_header, parse_feature_table, parse_header,
                                  unknown_incompatible_message)

KiB, MiB = 1024, 1024 * 1024


def read_head(path: str, n: int = 2 * MiB) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def spec_fields(buf: bytes) -> dict:
    """Decode the header with offsets straight from docs/interop/qcow2.txt (independent of qcowpy)."""
    f = {}
    f["magic"], f["version"], f["backing_file_offset"], f["backing_file_size"], f["cluster_bits"] = \
        struct.unpack_from(">IIQII", buf, 0)
    f["size"], f["crypt_method"], f["l1_size"], f["l1_table_offset"] = struct.unpack_from(">QIIQ", buf, 24)
    f["refcount_table_offset"], f["refcount_table_clusters"], f["nb_snapshots"], f["snapshots_offset"] = \
        struct.unpack_from(">QIIQ", buf, 48)
    if f["version"] >= 3:
        (f["incompatible_features"], f["compatible_features"], f["autoclear_features"], f["refcount_order"],
         f["header_length"]) = struct.unpack_from(">QQQII", buf, 72)
        f["compression_type"] = buf[104] if f["header_length"] > 104 else 0
    return f


# Every option combination below is created by qemu-img; (options, backing?)
CASES = []
for cb in range(9, 22):
    CASES.append({"cluster_size": 1 << cb, "compat": "1.1"})
    CASES.append({"cluster_size": 1 << cb, "compat": "0.10"})
for rb in (1, 2, 4, 8, 16, 32, 64):
    CASES.append({"refcount_bits": rb})
CASES += [
    {"compression_type": "zstd"},
    {"lazy_refcounts": "on"},
    {"extended_l2": "on"},
    {"extended_l2": "on", "cluster_size": 2 * MiB, "compression_type": "zstd", "lazy_refcounts": "on",
     "refcount_bits": 64},
    {"backing": True},
    {"backing": True, "compat": "0.10"},
    {"backing": True, "cluster_size": 512},
]


def case_id(c: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.interop
@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_header_round_trip_against_qemu(qemu, tmp_path, case):
    opts = dict(case)
    backing = opts.pop("backing", False)
    path = str(tmp_path / "img.qcow2")
    bpath = None
    if backing:
        bpath = str(tmp_path / "some-base-image.qcow2")
        qemu.create(bpath, 3 * MiB)
    qemu.create(path, 3 * MiB + 512, backing=bpath, backing_fmt="qcow2" if bpath else None, **opts)
    buf = read_head(path)
    h = parse_header(buf, len(buf))
    spec = spec_fields(buf)
    info = qemu.info_json(path)
    for k, v in spec.items():
        if k == "magic":
            assert v == int.from_bytes(C.MAGIC, "big")
        else:
            assert getattr(h, k) == v, k
    # the values qemu-img reports about the same file
    assert h.cluster_size == info["cluster-size"]
    assert h.size == info["virtual-size"] == 3 * MiB + 512
    fs = info["format-specific"]["data"]
    assert ("1.1" if h.version == 3 else "0.10") == fs["compat"]
    if h.version == 3:
        assert h.refcount_bits == fs["refcount-bits"]
        assert C.COMPRESSION_NAMES[h.compression_type] == fs["compression-type"]
        assert bool(h.compatible_features & C.COMPAT_LAZY_REFCOUNTS) == fs["lazy-refcounts"]
        assert h.extended_l2 == fs["extended-l2"]
        assert h.header_length == C.V3_HEADER_SIZE
    else:
        assert h.refcount_bits == 16 and h.header_length == C.V2_HEADER_SIZE
    assert h.backing_file == info.get("backing-filename")
    assert h.backing_format == info.get("backing-filename-format")
    # pack(parse(x)) reproduces qemu-img's bytes; the rest of the header cluster is zero
    packed = pack_header(h.copy())
    assert packed == buf[:len(packed)]
    assert buf[len(packed):h.cluster_size].count(0) == h.cluster_size - len(packed)
    # and parse(pack(...)) gives the same header back
    again = parse_header(packed + bytes(h.cluster_size - len(packed)))
    assert again == h
    # the feature name table, when QEMU writes one, names exactly the features qcowpy knows
    ft = h.find_extension(C.EXT_FEATURE_TABLE)
    if ft is not None:
        assert parse_feature_table(ft.data) == list(C.FEATURE_NAMES)


def test_v2_and_v3_pack_parse_pure():
    for version in (2, 3):
        h = Header(version=version, cluster_bits=12, size=123 * MiB, l1_size=5, l1_table_offset=3 << 12,
                   refcount_table_offset=1 << 12, refcount_table_clusters=1, nb_snapshots=0,
                   header_length=C.V3_HEADER_SIZE if version == 3 else C.V2_HEADER_SIZE,
                   refcount_order=4, backing_file="dir/base image.raw")
        h.set_extension(C.EXT_BACKING_FORMAT, b"raw")
        data = pack_header(h)  # also sets backing_file_offset/size from the layout
        assert data[:4] == C.MAGIC
        assert len(data) <= 4096
        g = parse_header(data + bytes(4096 - len(data)))
        assert g == h
        assert g.backing_format == "raw" and g.backing_file == "dir/base image.raw"
        assert spec_fields(data)["backing_file_offset"] == g.backing_file_offset


def make_qemu_image(qemu, tmp_path, name="img.qcow2", **opts) -> str:
    path = str(tmp_path / name)
    qemu.create(path, MiB, **opts)
    qemu.io(path, "write -P 0x3c 0 70000")
    return path


def rewrite_header(path: str, mutate) -> None:
    with open(path, "r+b") as f:
        buf = f.read(1 << 16)
        h = parse_header(buf)
        mutate(h)
        data = pack_header(h)
        f.seek(0)
        f.write(data + bytes(h.cluster_size - len(data)))


@pytest.mark.interop
def test_unknown_extension_preserved_verbatim(qemu, tmp_path):
    path = make_qemu_image(qemu, tmp_path, backing=None)
    odd = bytes(range(13))  # odd length: padded to 8 on disk, kept exactly in memory
    rewrite_header(path, lambda h: h.extensions.append(Extension(0x12345678, odd)))
    # QEMU accepts it (and it is still there after QEMU reads it)
    qemu.assert_clean(path)
    h = parse_header(read_head(path))
    ext = h.find_extension(0x12345678)
    assert ext is not None and ext.data == odd
    assert pack_header(h.copy()) == read_head(path)[:len(pack_header(h.copy()))]
    # a read-write open that rewrites the header (clearing an unknown autoclear bit) keeps it
    with open(path, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", 1 << 40))
    with qcowpy.open(path, "r+") as dev:
        dev.pwrite(b"x" * 100, 5)
    h2 = parse_header(read_head(path))
    assert h2.autoclear_features == 0
    assert h2.find_extension(0x12345678).data == odd
    assert [e.type for e in h2.extensions] == [e.type for e in h.extensions]
    qemu.assert_clean(path)
    # QEMU itself rewrites the header with the extension kept too: our packing agrees with it
    qemu.img("amend", "-o", "lazy_refcounts=on", path)
    h3 = parse_header(read_head(path))
    assert h3.find_extension(0x12345678).data == odd


@pytest.mark.interop
@pytest.mark.parametrize("named", [True, False])
def test_unknown_incompatible_bit_is_refused_by_name(qemu, tmp_path, named):
    path = make_qemu_image(qemu, tmp_path)  # 64k clusters: QEMU wrote a feature table

    def mutate(h: Header) -> None:
        h.incompatible_features |= 1 << 9
        if named:
            ft = h.find_extension(C.EXT_FEATURE_TABLE)
            h.set_extension(C.EXT_FEATURE_TABLE, ft.data + struct.pack(">BB46s", 0, 9, b"warp drive"))
    rewrite_header(path, mutate)
    before = read_head(path)
    # QEMU's message names the feature from the table (or its bit mask without an entry)
    p = qemu.img("info", path, check=False)
    assert p.returncode != 0
    expected = "warp drive" if named else "Unknown incompatible feature: 200"
    assert expected in p.stderr
    for mode in ("r", "r+"):
        with pytest.raises(UnsupportedFeature) as ei:
            qcowpy.open(path, mode)
        assert expected in str(ei.value)
        assert "Unsupported qcow2 feature" in str(ei.value)
    assert read_head(path) == before  # refusing touched nothing


@pytest.mark.interop
def test_unknown_autoclear_bits_cleared_on_rw_open_like_qemu(qemu, tmp_path):
    path = make_qemu_image(qemu, tmp_path)
    with open(path, "r+b") as f:
        f.seek(88)
        f.write(struct.pack(">Q", (1 << 7) | (1 << 33)))
    ours = str(tmp_path / "ours.qcow2")
    shutil.copy(path, ours)
    # read-only open leaves the bits (and the bytes) alone
    before = read_head(ours)
    with qcowpy.open(ours) as dev:
        dev.pread(4096, 0)
    assert read_head(ours) == before
    with qcowpy.open(ours, "r+"):
        pass
    # QEMU clears them on a read-write open as well
    qemu.io(path, "read 0 512")
    assert spec_fields(read_head(path))["autoclear_features"] == 0
    assert spec_fields(read_head(ours))["autoclear_features"] == 0
    qemu.assert_clean(ours)


@pytest.mark.interop
def test_unknown_compatible_bits_ignored_and_kept(qemu, tmp_path):
    path = make_qemu_image(qemu, tmp_path)
    with open(path, "r+b") as f:
        f.seek(80)
        f.write(struct.pack(">Q", 1 << 17))
    with qcowpy.open(path, "r+") as dev:
        dev.pwrite(b"\x01" * 5000, 100000)
        assert dev.pread(5000, 100000) == b"\x01" * 5000
    assert spec_fields(read_head(path))["compatible_features"] == 1 << 17
    qemu.assert_clean(path)


@pytest.mark.parametrize("mutate,exc", [
    (lambda b: b.__setitem__(slice(0, 4), b"QFI\xfa"), FormatError),
    (lambda b: b.__setitem__(slice(4, 8), struct.pack(">I", 4)), UnsupportedFeature),
    (lambda b: b.__setitem__(slice(20, 24), struct.pack(">I", 8)), CorruptImage),
    (lambda b: b.__setitem__(slice(20, 24), struct.pack(">I", 22)), CorruptImage),
    (lambda b: b.__setitem__(slice(96, 100), struct.pack(">I", 7)), CorruptImage),  # refcount_order 7
    (lambda b: b.__setitem__(slice(100, 104), struct.pack(">I", 100)), CorruptImage),  # header_length < 104
    (lambda b: b.__setitem__(104, 5), UnsupportedFeature),  # compression type 5
    (lambda b: b.__setitem__(104, 1), CorruptImage),  # zstd without the incompatible bit
])
def test_bad_header_fields(mutate, exc):
    h = Header(version=3, cluster_bits=16, size=MiB, l1_size=1, l1_table_offset=3 << 16,
               refcount_table_offset=1 << 16, refcount_table_clusters=1)
    buf = bytearray(pack_header(h) + bytes(4096))
    mutate(buf)
    with pytest.raises(exc):
        parse_header(bytes(buf))


def test_truncated_and_foreign_headers():
    with pytest.raises(FormatError):
        parse_header(b"hello world" * 10)
    with pytest.raises(CorruptImage):
        parse_header(C.MAGIC + bytes(20))
    with pytest.raises(QcowError):
        parse_header(pack_header(Header(cluster_bits=16))[:90])


def test_header_extension_overflowing_cluster_is_refused():
    h = Header(cluster_bits=9)
    buf = bytearray(pack_header(h) + bytes(1024))
    struct.pack_into(">II", buf, 112, 0x1234, 4000)
    with pytest.raises(CorruptImage):
        parse_header(bytes(buf))


def test_backing_name_out_of_cluster_is_refused():
    h = Header(cluster_bits=9, backing_file="b.raw")
    buf = bytearray(pack_header(h) + bytes(1024))
    struct.pack_into(">QI", buf, 8, 500, 100)  # name crosses the end of the 512-byte cluster
    with pytest.raises(CorruptImage):
        parse_header(bytes(buf))


def _entry(ftype: int, bit: int, name: str) -> bytes:
    return bytes([ftype, bit]) + name.encode().ljust(46, b"\0")


@pytest.mark.parametrize("table,bits,want", [
    (None, [63], "Unknown incompatible feature: 8000000000000000"),
    (bytes([0, 63]) + b"Test feature", [63], "Test feature"),  # a short entry reads zero-padded
    (bytes([0, 63]) + b"Test feature", [61, 62, 63], "Test feature, Unknown incompatible feature: 6000000000000000"),
    (_entry(0, 61, "test1") + _entry(0, 62, "test2"), [61, 62, 63],
     "test1, test2, Unknown incompatible feature: 8000000000000000"),
    (_entry(1, 61, "test1") + _entry(0, 62, "test2") + _entry(2, 63, "test3") + _entry(0, 60, "test4"), [61, 62, 63],
     "test2, Unknown incompatible feature: a000000000000000"),  # only incompatible entries name bits
    (_entry(0, 61, "a") + bytes(48) + _entry(0, 62, "b"), [61, 62], "a, Unknown incompatible feature: 4000000000000000"),
])
def test_unsupported_feature_message_like_qemu(table, bits, want):
    """QEMU's report_unsupported_feature (iotest 036): the image's table names bits in table order,
    stopping at the first nameless entry; the rest are one hexadecimal mask."""
    h = Header(version=3, cluster_bits=16, size=1 << 20)
    h.incompatible_features = sum(1 << b for b in bits)
    if table is not None:
        h.set_extension(C.EXT_FEATURE_TABLE, table)
    assert unknown_incompatible_message(h) == "Unsupported qcow2 feature(s): " + want
