"""Damaged images answered as qemu-img 7.2 answers them (issue 14, part 1).

Each case starts from an image qemu-img creates, patches bytes at offsets read from its header,
and runs qcowpy and qemu-img side by side on identical copies: the same exit code, stdout and
stderr (our program name written as qemu-img's)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
from typing import Callable

import pytest

from tests.cli.helpers import as_qemu, qcowpy, qemu

EXT_BITMAPS = 0x23852875
EXT_BACKING_FORMAT = 0xE2792ACA


def _u32(buf: bytearray, off: int) -> int:
    return struct.unpack_from(">I", buf, off)[0]


def _u64(buf: bytearray, off: int) -> int:
    return struct.unpack_from(">Q", buf, off)[0]


def _extension(buf: bytearray, etype: int) -> int:
    """Offset of the header extension ``etype``'s (type, length) pair in a v3 image."""
    off = (_u32(buf, 100) + 7) & ~7
    while True:
        t, n = struct.unpack_from(">II", buf, off)
        if t == etype:
            return off
        assert t != 0, f"extension {etype:#x} not found"
        off += 8 + ((n + 7) & ~7)


def _patched(tmp_path, qemu_img: str, patch: Callable[[bytearray], None], size: str = "4M",
             setup: list[list[str]] = (), io: list[str] = (), opts: list[str] = ()) -> tuple[str, str]:
    """An image qemu-img made (then ``setup`` qemu-img commands and ``io`` qemu-io commands),
    patched by ``patch``: two identical copies, (for qemu-img, for qcowpy)."""
    src = str(tmp_path / "src.qcow2")
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", *opts, src, size).code == 0
    for args in setup:
        r = qemu(qemu_img, *[a.replace("IMG", src) for a in args])
        assert r.code == 0, r
    if io:
        argv = [os.path.join(os.path.dirname(qemu_img), "qemu-io"), "-f", "qcow2"]
        for c in io:
            argv += ["-c", c]
        p = subprocess.run([*argv, src], capture_output=True, text=True)
        assert p.returncode == 0 and "error" not in p.stdout.lower(), p.stdout + p.stderr
    buf = bytearray(open(src, "rb").read())
    patch(buf)
    theirs, ours = str(tmp_path / "theirs.qcow2"), str(tmp_path / "ours.qcow2")
    for p in (theirs, ours):
        with open(p, "wb") as f:
            f.write(buf)
    return theirs, ours


def _same(qemu_img: str, theirs: str, ours: str, *args: str) -> tuple:
    """Run ``args`` (THE_IMAGE standing for the image, OUT for an output file) with both tools;
    assert the same code and output, with paths made alike. Returns (qemu result, ours)."""
    def argv(img: str) -> list[str]:
        d = os.path.dirname(img)
        return [a.replace("THE_IMAGE", img).replace("OUT", os.path.join(d, f"out-{os.path.basename(img)}"))
                for a in args]
    q = qemu(qemu_img, *argv(theirs))
    o = qcowpy(*argv(ours))
    def alike(text: str, img: str) -> str:
        out = os.path.join(os.path.dirname(img), f"out-{os.path.basename(img)}")
        return text.replace(out, "OUT").replace(img, "IMG")
    norm = [(r.code, alike(r.out, img), alike(as_qemu(r.err), img)) for r, img in ((q, theirs), (o, ours))]
    assert norm[1] == norm[0], f"qcowpy {norm[1]}\nqemu-img {norm[0]}"
    return q, o


def _dir_offset(buf: bytearray) -> int:
    return _extension(buf, EXT_BITMAPS) + 8 + 16


BITMAP = [["bitmap", "--add", "IMG", "b0"]]

# name -> (patch, qemu-img commands run on the image before patching)
REFUSED_AT_OPEN: dict[str, tuple[Callable[[bytearray], None], list]] = {
    "bitmaps_ext_wrong_length": (lambda b: struct.pack_into(">I", b, _extension(b, EXT_BITMAPS) + 4, 16), BITMAP),
    "bitmap_directory_past_eof": (lambda b: struct.pack_into(">Q", b, _dir_offset(b), 1 << 40), BITMAP),
    "bitmap_directory_unaligned": (lambda b: struct.pack_into(">Q", b, _dir_offset(b), _u64(b, _dir_offset(b)) + 8),
                                   BITMAP),
    "bitmap_count_absurd": (lambda b: struct.pack_into(">I", b, _extension(b, EXT_BITMAPS) + 8, 0xFFFFFF), BITMAP),
    "bitmap_count_zero": (lambda b: struct.pack_into(">I", b, _extension(b, EXT_BITMAPS) + 8, 0), BITMAP),
    "bitmap_directory_size_absurd": (lambda b: struct.pack_into(">Q", b, _extension(b, EXT_BITMAPS) + 16, 1 << 40),
                                     BITMAP),
    "bitmap_reserved_nonzero": (lambda b: struct.pack_into(">I", b, _extension(b, EXT_BITMAPS) + 12, 1), BITMAP),
    "refcount_table_clusters_zero": (lambda b: struct.pack_into(">I", b, 56, 0), []),
    "snapshot_table_unaligned": (lambda b: struct.pack_into(">Q", b, 64, _u64(b, 64) + 8),
                                 [["snapshot", "-c", "s1", "IMG"]]),
    "snapshot_extra_data_too_large": (lambda b: struct.pack_into(">I", b, _u64(b, 64) + 36, 1025),
                                      [["snapshot", "-c", "s1", "IMG"]]),
    "backing_format_too_long": (lambda b: _long_backing_format(b), []),
    # iotest 054: more L1 entries than QEMU's int holds ("Image is too big", before "L1 table is too small")
    "size_one_exabyte": (lambda b: struct.pack_into(">Q", b, 24, 1 << 60), []),
    # iotest 036: unknown incompatible bits named from the image's own feature table
    "incompatible_bits_unknown": (lambda b: struct.pack_into(">Q", b, 72, 0xE000000000000001), []),
}


def _long_backing_format(buf: bytearray) -> None:
    """Replace the (empty) extension area with a 16-byte backing format extension (QEMU takes
    at most 15 bytes)."""
    off = (_u32(buf, 100) + 7) & ~7
    struct.pack_into(">II16sII", buf, off, EXT_BACKING_FORMAT, 16, b"qcow2qcow2qcow2q", 0, 0)


@pytest.mark.parametrize("name", sorted(REFUSED_AT_OPEN))
@pytest.mark.parametrize("cmd", ["info", "convert"])
def test_refused_at_open(tmp_path, qemu_img, name, cmd):
    patch, setup = REFUSED_AT_OPEN[name]
    theirs, ours = _patched(tmp_path, qemu_img, patch, setup=setup)
    args = ("info", "THE_IMAGE") if cmd == "info" else ("convert", "-O", "raw", "THE_IMAGE", "OUT")
    q, _ = _same(qemu_img, theirs, ours, *args)
    assert q.code == 1  # the case still damages the image the way it means to


def _file_end(buf: bytearray) -> int:
    return (len(buf) + 0xFFFF) & ~0xFFFF


# Damage qemu-img check opens (BDRV_O_CHECK relaxes the open) and reports: name -> patch
CHECKED: dict[str, Callable[[bytearray], None]] = {
    "l1_offset_past_eof": lambda b: struct.pack_into(">Q", b, 40, _file_end(b) + (4 << 16)),
    "l1_size_past_eof": lambda b: struct.pack_into(">I", b, 36, 0x10000),
    "reftable_offset_past_eof": lambda b: struct.pack_into(">Q", b, 48, _file_end(b) + (4 << 16)),
    "reftable_clusters_past_eof": lambda b: struct.pack_into(">I", b, 56, 100),
    "reftable_clusters_zero": lambda b: struct.pack_into(">I", b, 56, 0),
    "reftable_overlaps_l1": lambda b: struct.pack_into(">Q", b, 48, _u64(b, 40)),
}


@pytest.mark.parametrize("name", sorted(CHECKED))
@pytest.mark.parametrize("output", ["human", "json"])
def test_check_reports_like_qemu(tmp_path, qemu_img, name, output):
    """The same report, exit code (2 corruptions, 1 internal errors) and no traceback."""
    theirs, ours = _patched(tmp_path, qemu_img, CHECKED[name], io=["write -P 1 0 64k", "write -P 2 1M 64k"])
    q, o = _same(qemu_img, theirs, ours, "check", f"--output={output}", "THE_IMAGE")
    assert q.code in (1, 2) and "Traceback" not in o.err
    with open(ours, "rb") as a, open(theirs, "rb") as b:
        assert a.read() == b.read()  # a check without -r writes nothing


def _chain(tmp_path, qemu_img: str, old: bytes, new: bytes, target: str = "x2.qcow2") -> str:
    """x0 <- x1 <- x2 made by qemu-img, then ``old`` replaced by ``new`` (same length) in ``target``'s
    header: a backing name or format rewritten in place."""
    def make(name: str, *args: str) -> str:
        r = qemu(qemu_img, "create", "-q", "-f", "qcow2", *args, str(tmp_path / name), "4M")
        assert r.code == 0, r
        return str(tmp_path / name)
    make("x0.qcow2")
    make("x1.qcow2", "-b", "x0.qcow2", "-F", "qcow2")
    top = make("x2.qcow2", "-b", "x1.qcow2", "-F", "qcow2")
    path = str(tmp_path / target)
    buf = bytearray(open(path, "rb").read())
    i = buf.index(old, 0, 65536)
    buf[i:i + len(old)] = new
    with open(path, "wb") as f:
        f.write(buf)
    return top


@pytest.mark.parametrize("case", ["missing", "bogus_format", "missing_below", "bogus_format_below"])
def test_check_opens_the_backing_chain(tmp_path, qemu_img, case):
    """qemu-img check opens the whole chain first: a backing file it cannot open fails the check."""
    old, new, target = {"missing": (b"x1.qcow2", b"x9.qcow2", "x2.qcow2"),
                        "bogus_format": (b"qcow2\0", b"bogus\0", "x2.qcow2"),
                        "missing_below": (b"x0.qcow2", b"x9.qcow2", "x1.qcow2"),
                        "bogus_format_below": (b"qcow2\0", b"bogus\0", "x1.qcow2")}[case]
    top = _chain(tmp_path, qemu_img, old, new, target)
    for args in (("check", top), ("check", "--output=json", top), ("check", "-r", "all", top)):
        q, o = qemu(qemu_img, *args), qcowpy(*args)
        assert (o.code, o.out, as_qemu(o.err)) == (q.code, q.out, q.err)
        assert q.code == 1 and "Could not open backing file" in q.err


def _fd_limit() -> None:
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


@pytest.mark.parametrize("case", ["refers_to_itself", "two_image_cycle"])
def test_check_backing_loop(tmp_path, qemu_img, case):
    """A chain that loops: qemu-img check opens it until it runs out of file descriptors (under
    the usual limit of 1024) and exits 1; qcowpy detects the loop and exits 1 at once."""
    if case == "refers_to_itself":
        top = _chain(tmp_path, qemu_img, b"x1.qcow2", b"x2.qcow2")
    else:  # x1 <- x2, and x1 now backed by x2
        top = _chain(tmp_path, qemu_img, b"x0.qcow2", b"x2.qcow2", "x1.qcow2")
    p = subprocess.run([qemu_img, "check", top], capture_output=True, text=True, timeout=300,
                       preexec_fn=_fd_limit)
    assert p.returncode == 1 and p.stdout == "" and "Could not open backing file" in p.stderr
    o = qcowpy("check", top)
    assert o.code == 1 and o.out == ""
    assert as_qemu(o.err) == f"qemu-img: Could not open '{top}': Backing file chain of '{top}' contains a loop\n"


@pytest.mark.parametrize("cut", [1, 300, 511])
def test_size_not_a_multiple_of_512(tmp_path, qemu_img, cut):
    """A header size with a partial last sector: qemu-img reports and reads whole sectors only."""
    theirs, ours = _patched(tmp_path, qemu_img, lambda b: struct.pack_into(">Q", b, 24, (4 << 20) - cut),
                            io=["write -P 7 0 4M"])
    for args in (("info", "THE_IMAGE"), ("info", "--output=json", "THE_IMAGE"), ("map", "THE_IMAGE"),
                 ("map", "--output=json", "THE_IMAGE"), ("check", "THE_IMAGE"),
                 ("convert", "-O", "raw", "THE_IMAGE", "OUT"), ("compare", "THE_IMAGE", "OUT"),
                 ("convert", "-O", "qcow2", "THE_IMAGE", "OUT"), ("info", "OUT")):
        _same(qemu_img, theirs, ours, *args)
    q = qemu(qemu_img, "info", "--output=json", theirs)
    assert f'"virtual-size": {(4 << 20) - 512}' in q.out  # the case is what it means to be
    with open(str(tmp_path / "out-theirs.qcow2"), "rb") as a, open(str(tmp_path / "out-ours.qcow2"), "rb") as b:
        assert len(a.read()) == len(b.read())


def _zero_flag_in_v2(buf: bytearray) -> None:
    """Set the zero flag (bit 0) in the L2 entry of guest cluster 1 (allocated data)."""
    l2 = _u64(buf, _u64(buf, 40)) & 0x00FFFFFFFFFFFE00
    struct.pack_into(">Q", buf, l2 + 8, _u64(buf, l2 + 8) | 1)


@pytest.mark.parametrize("args", [("convert", "-O", "raw", "THE_IMAGE", "OUT"), ("map", "THE_IMAGE"),
                                  ("map", "--output=json", "THE_IMAGE"), ("compare", "THE_IMAGE", "THE_IMAGE"),
                                  ("check", "THE_IMAGE"), ("info", "THE_IMAGE")])
def test_zero_flag_in_v2_image(tmp_path, qemu_img, args):
    """v2 has no zero clusters: QEMU reports the entry as corruption (non-fatal on a read-only
    image, nothing written) and fails the access with EIO; the tools word it as qemu-img does."""
    theirs, ours = _patched(tmp_path, qemu_img, _zero_flag_in_v2, opts=["-o", "compat=0.10"],
                            io=["write -P 5 0 128k"])
    before = open(ours, "rb").read()
    _same(qemu_img, theirs, ours, *args)
    assert open(ours, "rb").read() == before


def test_zero_flag_in_v2_image_reads(tmp_path, qemu_img):
    """Reads of the cluster fail (qemu-io: 'read failed: Input/output error'), reads beside it do not."""
    import qcowpy as api
    from qcowpy.errors import CorruptedRead
    theirs, ours = _patched(tmp_path, qemu_img, _zero_flag_in_v2, opts=["-o", "compat=0.10"],
                            io=["write -P 5 0 128k"])
    qio = os.path.join(os.path.dirname(qemu_img), "qemu-io")

    def qemu_reads(cmd: str) -> bool:
        p = subprocess.run([qio, "-r", "-f", "qcow2", "-c", cmd, theirs], capture_output=True, text=True)
        return "read failed: Input/output error" not in p.stdout + p.stderr
    with api.open(ours, "r") as dev:
        for offset, length in ((0, 65536), (65536, 65536), (65536 + 512, 512), (0, 131072), (131072, 4096)):
            try:
                data = dev.pread(length, offset)
                ok = True
            except CorruptedRead:
                ok = False
            assert ok == qemu_reads(f"read {offset} {length}"), (offset, length)
            if ok and offset < 131072:
                assert data == b"\x05" * length


def _second_backing_format(buf: bytearray) -> None:
    """Append a second backing-format extension ("foo") after the first (iotest 114)."""
    name_off, name_len = _u64(buf, 8), _u32(buf, 16)
    name = bytes(buf[name_off:name_off + name_len])
    off = (_u32(buf, 100) + 7) & ~7
    while _u32(buf, off) != 0:
        off += 8 + ((_u32(buf, off + 4) + 7) & ~7)
    struct.pack_into(">II8sII", buf, off, EXT_BACKING_FORMAT, 3, b"foo", 0, 0)
    buf[off + 24:off + 24 + name_len] = name  # the backing file name moves behind the new end marker
    struct.pack_into(">Q", buf, 8, off + 24)


def test_two_backing_format_extensions(tmp_path, qemu_img):
    """QEMU reads the extensions in order, so the last backing format wins; ``rebase -u -F``
    then writes one extension in place of both."""
    base = str(tmp_path / "base.qcow2")
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", base, "4M").code == 0
    theirs, ours = _patched(tmp_path, qemu_img, _second_backing_format, opts=["-b", base, "-F", "qcow2"])
    _same(qemu_img, theirs, ours, "info", "-U", "THE_IMAGE")
    _same(qemu_img, theirs, ours, "rebase", "-u", "-b", base, "-F", "qcow2", "THE_IMAGE")
    assert open(theirs, "rb").read(4096) == open(ours, "rb").read(4096)
    _same(qemu_img, theirs, ours, "info", "THE_IMAGE")


def test_zero_flag_in_v2_image_opened_read_write(tmp_path, qemu_img):
    """Opened read-write, QEMU's corruption signal is fatal: "Marking image as corrupt", the
    access fails; v2 has no feature bits, so the mark stays in memory and the file is unchanged
    (here through rebase, whose safe mode asks the overlay's allocation first)."""
    theirs, ours = _patched(tmp_path, qemu_img, _zero_flag_in_v2, opts=["-o", "compat=0.10"],
                            io=["write -P 5 0 128k"])
    before = open(ours, "rb").read()
    _same(qemu_img, theirs, ours, "rebase", "-b", "", "THE_IMAGE")
    assert open(ours, "rb").read() == before == open(theirs, "rb").read()


def test_zero_flag_marks_a_v3_image_corrupt_when_writable(tmp_path, qemu_img):
    """The same fatal signal on v3 sets the corrupt bit on disk (and writes nothing else); a
    v3 image has zero clusters, so the broken entry here is an unaligned data offset."""
    import qcowpy as api
    from qcowpy.errors import CorruptImage

    def unaligned(buf: bytearray) -> None:
        l2 = _u64(buf, _u64(buf, 40)) & 0x00FFFFFFFFFFFE00
        struct.pack_into(">Q", buf, l2 + 8, _u64(buf, l2 + 8) | 0x200)
    theirs, ours = _patched(tmp_path, qemu_img, unaligned, io=["write -P 5 0 128k"])
    qio = os.path.join(os.path.dirname(qemu_img), "qemu-io")
    subprocess.run([qio, "-f", "qcow2", "-c", "read 64k 64k", theirs], capture_output=True, text=True)
    with pytest.raises(CorruptImage):
        with api.open(ours, "r+") as dev:
            dev.pread(65536, 65536)
    assert open(ours, "rb").read() == open(theirs, "rb").read()
    info = [qemu(qemu_img, "info", "--output=json", p).out.replace(p, "IMG") for p in (ours, theirs)]
    assert info[0] == info[1] and '"corrupt": true' in info[0]


def _zstd_stream_past_cluster(buf: bytearray, extra: int, declared: bool) -> None:
    """Replace guest cluster 0's zstd stream with one that inflates to a cluster plus ``extra``
    bytes (64 KiB clusters; the new frame fits the sectors the descriptor names)."""
    import zstandard
    l2 = _u64(buf, _u64(buf, 40)) & 0x00FFFFFFFFFFFE00
    entry = _u64(buf, l2)
    assert entry & (1 << 62), "cluster 0 is not compressed"
    host = entry & ((1 << 54) - 1)  # cluster_bits 16: 62 - (16 - 8) offset bits
    frame = zstandard.ZstdCompressor(write_content_size=declared).compress(b"\x07" * (65536 + extra))
    nsect = ((entry >> 54) & 0xFF) + 1
    assert len(frame) <= nsect * 512 - (host & 511)
    buf[host:host + len(frame)] = frame


@pytest.mark.parametrize("declared", [True, False], ids=["size-declared", "size-not-declared"])
@pytest.mark.parametrize("args", [("convert", "-O", "raw", "THE_IMAGE", "OUT"), ("compare", "THE_IMAGE", "THE_IMAGE"),
                                  ("check", "THE_IMAGE")])
def test_zstd_stream_past_the_cluster(tmp_path, qemu_img, args, declared):
    """QEMU reads a zstd cluster until the cluster is full and fails with EIO when the frame has
    more to give; the tools word it as qemu-img does."""
    theirs, ours = _patched(tmp_path, qemu_img, lambda b: _zstd_stream_past_cluster(b, 4096, declared),
                            opts=["-o", "compression_type=zstd"], io=["write -c -P 7 0 64k", "write -P 8 64k 64k"])
    _same(qemu_img, theirs, ours, *args)


@pytest.mark.parametrize("args", [["amend", "-o", "compat=0.10", "THE_IMAGE"],
                                  ["amend", "-o", "lazy_refcounts=off", "THE_IMAGE"],
                                  ["resize", "THE_IMAGE", "+1M"], ["snapshot", "-c", "s1", "THE_IMAGE"]],
                         ids=lambda a: " ".join(a[:-1]))
def test_dirty_image_opened_read_write_is_repaired_aloud(tmp_path, qemu_img, args):
    """A lazy-refcounts image left dirty by a killed writer: QEMU's read-write open repairs it
    and prints the check's findings on stderr; the repaired files then check the same."""
    src = str(tmp_path / "src.qcow2")
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", src, "64M").code == 0
    qio = os.path.join(os.path.dirname(qemu_img), "qemu-io")
    subprocess.run([qio, "-f", "qcow2", "-c", "write -P 0x2a 0 128k", "-c", "flush", "-c", "sigraise 9", src],
                   capture_output=True)
    buf = open(src, "rb").read()
    assert _u64(bytearray(buf), 72) & 1, "the killed writer left the dirty bit"
    theirs, ours = str(tmp_path / "theirs.qcow2"), str(tmp_path / "ours.qcow2")
    for p in (theirs, ours):
        open(p, "wb").write(buf)
    q, _ = _same(qemu_img, theirs, ours, *args)
    assert "Rebuilding refcount structure" in q.err
    if args[0] != "snapshot":  # qcowpy's snapshot transaction places its tables elsewhere (documented)
        _same(qemu_img, theirs, ours, "check", "THE_IMAGE")
    assert qemu(qemu_img, "check", ours).code == 0


def _l2_entry0(buf: bytearray) -> int:
    """Offset of the first L2 entry of the first L2 table."""
    return _u64(buf, _u64(buf, 40)) & 0x00FFFFFFFFFFFE00


def _snap_l1(value: int, field: int) -> Callable[[bytearray], None]:
    """Patch the first snapshot entry's L1 offset (field 0, 8 bytes) or L1 size (field 8, 4 bytes)."""
    fmt = ">Q" if field == 0 else ">I"
    return lambda b: struct.pack_into(fmt, b, _u64(b, 64) + field, value)


WRITTEN = ["write -P 1 0 64k"]
SNAPSHOT = [["snapshot", "-c", "test", "IMG"]]
# name -> (patch, qemu-img setup, qemu-io commands, the command run on both copies)
SIGNALLED: dict[str, tuple] = {
    # iotest 060: zero-cluster expansion meets an unaligned L2 table / preallocated zero cluster
    "amend_unaligned_l2_table": (lambda b: struct.pack_into(">Q", b, _u64(b, 40), 0x8000000000042A00), [], WRITTEN,
                                 ["amend", "-o", "compat=0.10", "THE_IMAGE"]),
    "amend_unaligned_zero_cluster": (lambda b: struct.pack_into(">Q", b, _l2_entry0(b), 0x8000000000052A01), [],
                                     WRITTEN, ["amend", "-o", "compat=0.10", "THE_IMAGE"]),
    # iotest 080: the snapshot table count at its limit, an L2 entry far past the image
    "snapshot_count_at_limit": (lambda b: (struct.pack_into(">Q", b, 64, 1 << 24), struct.pack_into(">I", b, 60, 65536)),
                                [], [], ["snapshot", "-c", "test", "THE_IMAGE"]),
    "snapshot_l2_entry_past_reftable_limit": (lambda b: struct.pack_into(">Q", b, _l2_entry0(b), 0xBFFFFFFFFFFF0000),
                                              [], ["write 0 512"], ["snapshot", "-c", "test", "THE_IMAGE"]),
    "snapshot_l2_entry_past_refblocks": (lambda b: struct.pack_into(">Q", b, _l2_entry0(b), 0x80000000FFFFFF0000 & (2**64 - 1)),
                                         [], ["write 0 512"], ["snapshot", "-c", "test", "THE_IMAGE"]),
    # iotest 080: a snapshot's L1 table misplaced or too large, met by amend, apply and delete
    **{f"{cmd[0]}{cmd[1]}_snapshot_l1_{what}": (patch, SNAPSHOT, ["write 0 512"], [*cmd, "THE_IMAGE"])
       for what, patch in (("unaligned", _snap_l1(0x400200, 0)), ("too_large", _snap_l1(0x10000000, 8)))
       for cmd in (["amend", "-o", "compat=0.10"], ["snapshot", "-a", "test"], ["snapshot", "-d", "test"])},
}


@pytest.mark.parametrize("name", sorted(SIGNALLED))
def test_damage_met_by_amend_and_snapshots_as_qemu_img(tmp_path, qemu_img, name):
    """QEMU's per-structure messages and errno texts when amend and snapshot operations meet
    damaged tables (a fatal corruption marks the image corrupt on the way)."""
    patch, setup, io, args = SIGNALLED[name]
    theirs, ours = _patched(tmp_path, qemu_img, patch, size="64M", setup=setup, io=io)
    q, _ = _same(qemu_img, theirs, ours, *args)
    assert q.code == 1
    # the corrupt bit as qemu-img left it, read by qemu-img (where QEMU's failed refcount update
    # added a refcount block first, qcowpy's transaction leaves the file as it was)
    marks = [json.loads(qemu(qemu_img, "info", "-U", "--output=json", p).out)["format-specific"]["data"]["corrupt"]
             for p in (ours, theirs)]
    assert marks[0] == marks[1] == name.startswith("amend_unaligned")


def _reftable_entry(index: int, value: int) -> Callable[[bytearray], None]:
    return lambda b: struct.pack_into(">Q", b, _u64(b, 48) + 8 * index, value)


# iotest 060: resize --shrink drops unused refcount blocks and meets damaged ones
SHRINK_DAMAGE: dict[str, tuple[Callable[[bytearray], None], list[str]]] = {
    "refblock_far_past_the_image": (_reftable_entry(1, 0x00FFFFFF00000000), []),
    "refblock_no_block_covers": (_reftable_entry(1, 0x0000001000000000), ["-o", "refcount_bits=1"]),
    "refblock_counted_zero_times": (_reftable_entry(1, 0x100000), []),  # EINVAL, not EIO
    "refblock_unaligned": (lambda b: (_reftable_entry(1, 0x0000001000000000)(b), _reftable_entry(2, 0x200)(b)),
                           ["-o", "refcount_bits=1"]),
}


@pytest.mark.parametrize("name", sorted(SHRINK_DAMAGE))
def test_shrink_meets_damaged_refblocks_as_qemu_img(tmp_path, qemu_img, name):
    """The corruption is signalled (the image marked corrupt) and the resize fails with QEMU's
    words; a repair then leaves both files checking the same, and the retried shrink works."""
    patch, opts = SHRINK_DAMAGE[name]
    theirs, ours = _patched(tmp_path, qemu_img, patch, size="64M", opts=opts)
    q, _ = _same(qemu_img, theirs, ours, "resize", "--shrink", "THE_IMAGE", "32M")
    assert q.code == 1 and "Marking image as corrupt" in q.err
    _same(qemu_img, theirs, ours, "info", "THE_IMAGE")
    if name != "refblock_unaligned":  # QEMU's repair of that one marks the image corrupt again midway
        _same(qemu_img, theirs, ours, "check", "-r", "all", "THE_IMAGE")
        _same(qemu_img, theirs, ours, "resize", "--shrink", "THE_IMAGE", "32M")
