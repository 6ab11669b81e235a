"""``qcowpy check`` against ``qemu-img check`` on damaged images: same stdout, same per-problem
messages on stderr, same exit codes; ``-r leaks`` / ``-r all`` repair the same way, after which
qemu-img agrees the image is clean and the guest data is what QEMU's own repair leaves."""
from __future__ import annotations

import json
import shutil

import pytest

from qcowpy.format import constants as C

from . import images as I
from .conftest import qcowpy_cli, qemu_img

# --------------------------------------------------------------------------- scenarios


def clean_basic(p):
    return I.create(p, "4M", "write -P 0x11 0 300k", "write -P 0x22 2M 64k")


def clean_compressed(p):
    I.create(p, "4M", "write -c -P 0x33 0 64k", "write -c -P 0x44 64k 64k", "write -P 1 1M 4k")
    return p


def clean_small_clusters(p):
    return I.create(p, "1M", "write -P 7 0 100k", "write -P 8 600k 3k", cluster_size=512)


def clean_refcount_bits_1(p):
    return I.create(p, "2M", "write -P 9 0 200k", refcount_bits=1)


def clean_refcount_bits_64(p):
    return I.create(p, "2M", "write -P 9 0 200k", refcount_bits=64)


def clean_extended_l2(p):
    return I.create(p, "4M", "write -P 5 0 10k", "write -P 6 1M 64k", "write -z 2M 8k",
                    extended_l2="on", cluster_size=65536)


def clean_v2(p):
    return I.create(p, "4M", "write -P 5 0 70k", compat="0.10")


def clean_snapshot(p):
    I.create(p, "4M", "write -P 1 0 128k")
    I.sh("qemu-img", "snapshot", "-c", "snap1", p)
    I.sh("qemu-io", "-f", "qcow2", "-c", "write -P 2 0 64k", "-c", "write -P 3 1M 64k", p)
    return p


def clean_bitmap(p):
    I.create(p, "4M", "write -P 1 0 128k")
    I.sh("qemu-img", "bitmap", "--add", p, "b0")
    return p


def clean_empty(p):
    return I.create(p, "1G")


def leak_past_end(p):
    I.create(p, "4M", "write -P 1 0 64k")
    size = __import__("os").path.getsize(p)
    I.set_rc(p, size // 65536 + 2, 1)  # a cluster nothing references, past the data
    return p


def leak_refcount_two(p):
    I.create(p, "4M", "write -P 1 0 128k")
    host = I.u64(p, I.l2_entry_offset(p, 0)) & C.L2E_OFFSET_MASK
    I.set_rc(p, host >> 16, 2)  # refcount 2 > 1 reference, and COPIED is now wrong
    return p


def corrupt_refcount_zero(p):
    I.create(p, "4M", "write -P 1 0 128k")
    host = I.u64(p, I.l2_entry_offset(p, 1)) & C.L2E_OFFSET_MASK
    I.set_rc(p, host >> 16, 0)  # in use but free on disk: needs a rebuild
    return p


def corrupt_l2_twice(p):
    I.create(p, "2G", "write -P 1 0 64k")
    I.poke64(p, I.l1_entry_offset(p, 1), I.u64(p, I.l1_entry_offset(p, 0)))  # two L1 entries, one L2
    return p


def corrupt_l2_reserved(p):
    I.create(p, "4M", "write -P 1 0 64k")
    I.flip64(p, I.l2_entry_offset(p, 0), set_bits=0x2)
    return p


def corrupt_l1_reserved(p):
    I.create(p, "4M", "write -P 1 0 64k")
    I.flip64(p, I.l1_entry_offset(p, 0), set_bits=(1 << 60))
    return p


def corrupt_data_past_eof(p):
    I.create(p, "4M", "write -P 1 0 64k")
    I.poke64(p, I.l2_entry_offset(p, 3), (1 << 30) | C.OFLAG_COPIED)
    return p


def corrupt_copied_cleared(p):
    I.create(p, "4M", "write -P 1 0 128k")
    I.flip64(p, I.l2_entry_offset(p, 1), clear_bits=C.OFLAG_COPIED)
    I.flip64(p, I.l1_entry_offset(p, 0), clear_bits=C.OFLAG_COPIED)
    return p


def corrupt_compressed_copied(p):
    I.create(p, "4M", "write -c -P 3 0 64k")
    I.flip64(p, I.l2_entry_offset(p, 0), set_bits=C.OFLAG_COPIED)
    return p


def corrupt_reftable_reserved(p):
    I.create(p, "4M", "write -P 1 0 64k")
    h = I.header(p)
    I.poke64(p, h.refcount_table_offset, I.u64(p, h.refcount_table_offset) | 1)
    return p


def corrupt_refblock_outside(p):
    # iotest 060 style: a refcount block past the end of the file
    I.create(p, "4M", "write -P 1 0 64k")
    h = I.header(p)
    I.poke64(p, h.refcount_table_offset + 8, 1 << 30)
    return p


def corrupt_unaligned_zero_prealloc(p):
    I.create(p, "4M", "write -P 1 0 64k", "write -z 64k 64k")
    I.poke64(p, I.l2_entry_offset(p, 1), 0x30200 | C.OFLAG_ZERO)  # preallocated zero, unaligned
    return p


def corrupt_l2_is_refblock(p):
    # The L1 entry points at the refcount block, whose first 8 bytes (refcounts 1, 1, 1, 0x201) read
    # as an unaligned preallocated zero cluster: the -r all fix would write into the refcount block,
    # so the repair's overlap check must mark the image corrupt instead of writing.
    I.create(p, "4M", "write -P 1 0 64k")
    rb = I.u64(p, I.header(p).refcount_table_offset) & ~0x1FF
    I.set_rc(p, 3, 0x201)
    I.poke64(p, I.l1_entry_offset(p, 0), rb | C.OFLAG_COPIED)
    return p


def corrupt_unaligned_data(p):
    I.create(p, "4M", "write -P 1 0 64k")
    I.flip64(p, I.l2_entry_offset(p, 0), set_bits=0x200)
    return p


def corrupt_snapshot_refcount(p):
    clean_snapshot(p)
    h = I.header(p)
    from qcowpy.format.snapshot import parse_snapshot_table
    snaps = parse_snapshot_table(I.peek(p, h.snapshots_offset, 4096), h.nb_snapshots)
    I.set_rc(p, snaps[0].l1_table_offset >> 16, 0)
    return p


def corrupt_extl2_bitmap(p):
    I.create(p, "4M", "write -P 1 0 64k", extended_l2="on")
    off = I.l2_entry_offset(p, 0)
    I.poke64(p, off + 8, 0x1_0000_0001)  # subcluster 0 allocated and zero
    return p


def corrupt_reftable_self_zero(p):
    # the refcount block's own refcount dropped: rebuild needed
    I.create(p, "4M", "write -P 1 0 64k")
    h = I.header(p)
    rb = I.u64(p, h.refcount_table_offset) & ~0x1FF
    I.set_rc(p, rb >> 16, 0)
    return p


def dirty_lazy_killed(p):
    # iotest 039: qemu-io killed mid-flight leaves a dirty lazy-refcounts image
    I.create(p, "4M", lazy_refcounts="on", compat="1.1")
    import subprocess
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 512k", "-c", "sigraise 9", p],
                   capture_output=True)
    assert I.header(p).incompatible_features & C.INCOMPAT_DIRTY
    return p


def clean_unknown_autoclear_bit(p):
    # iotest 036: a writer that does not know an autoclear bit clears it when it opens the image
    I.create(p, "4M", "write -P 1 0 64k")
    I.flip64(p, 88, set_bits=1 << 63)
    return p


SCENARIOS = [f for name, f in sorted(globals().items())
             if callable(f) and name.split("_")[0] in ("clean", "leak", "corrupt", "dirty")]


def _same(ours, theirs, what):
    assert ours.code == theirs.code, f"{what}: exit {ours.code} != qemu-img {theirs.code}\n{ours}\n{theirs}"
    assert ours.out == theirs.out, f"{what}: stdout differs\nours:\n{ours.out}\nqemu-img:\n{theirs.out}"
    assert ours.err.replace("qcowpy: ", "qemu-img: ") == theirs.err, \
        f"{what}: stderr differs\nours:\n{ours.err}\nqemu-img:\n{theirs.err}"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_check_matches_qemu(qemu_tools, tmp_path, scenario):
    p = scenario(str(tmp_path / "img.qcow2"))
    before = I.peek(p, 0, 1 << 30)
    _same(qcowpy_cli("check", p), qemu_img("check", p), "human")
    ours, theirs = qcowpy_cli("check", "--output=json", p), qemu_img("check", "--output=json", p)
    _same(ours, theirs, "json")
    if ours.out:
        json.loads(ours.out)
    assert I.peek(p, 0, 1 << 30) == before, "check without -r modified the image"


@pytest.mark.parametrize("mode", ["leaks", "all"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_repair_matches_qemu(qemu_tools, tmp_path, scenario, mode):
    src = scenario(str(tmp_path / "src.qcow2"))
    a, b = str(tmp_path / "qemu.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(src, a)
    shutil.copy(src, b)
    theirs = qemu_img("check", "-r", mode, a)
    ours = qcowpy_cli("check", "-r", mode, b)
    _same(ours, theirs, f"check -r {mode}")
    # QEMU's verdict on our repaired image equals its verdict on its own repaired image
    after_a, after_b = qemu_img("check", a), qemu_img("check", b)
    assert after_b.code == after_a.code, f"{after_b}\n{after_a}"
    if mode == "all" and theirs.code == 0:
        assert after_b.code == 0 and "No errors were found" in after_b.out
        assert not I.header(b).incompatible_features & (C.INCOMPAT_CORRUPT | C.INCOMPAT_DIRTY)
    # guest-visible data equals what QEMU's repair leaves
    if after_a.code in (0, 3):
        cmp = qemu_img("compare", "-U", a, b)
        assert cmp.code == 0, cmp.out + cmp.err


def test_repair_writes_pass_the_overlap_check(qemu_tools, tmp_path):
    """The zero-entry repair of an "L2 table" that is really the refcount block is refused exactly as
    QEMU refuses it: the corrupt bit is set and nothing else is written (byte-identical to qemu-img)."""
    src = corrupt_l2_is_refblock(str(tmp_path / "src.qcow2"))
    a, b = str(tmp_path / "qemu.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(src, a)
    shutil.copy(src, b)
    theirs, ours = qemu_img("check", "-r", "all", a), qcowpy_cli("check", "-r", "all", b)
    _same(ours, theirs, "check -r all")
    assert ours.code == 1 and "overlaps with refcount block" in ours.err
    assert I.header(b).incompatible_features & C.INCOMPAT_CORRUPT
    assert I.peek(b, 0, 1 << 30) == I.peek(a, 0, 1 << 30)
    rb = I.u64(b, I.header(b).refcount_table_offset) & ~0x1FF
    assert I.peek(b, rb, 8) == I.peek(src, rb, 8)  # the refcount block was not overwritten


def test_copied_flag_repair_passes_the_overlap_check(qemu_tools, tmp_path):
    """The L1 entry points at the L1 table itself: after the refcount repair, the OFLAG_COPIED fix
    of that L1 entry would write into what is also an active L2 table. QEMU refuses it through its
    overlap check; so must we (same messages and exit code, corrupt bit set, L1 entry untouched)."""
    src = str(tmp_path / "src.qcow2")
    I.create(src, "4M")
    l1 = I.header(src).l1_table_offset
    I.poke64(src, l1, l1 | C.OFLAG_COPIED)
    a, b = str(tmp_path / "qemu.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(src, a)
    shutil.copy(src, b)
    theirs, ours = qemu_img("check", "-r", "all", a), qcowpy_cli("check", "-r", "all", b)
    _same(ours, theirs, "check -r all")
    assert ours.code == 1 and "Repairing OFLAG_COPIED L2 cluster" in ours.err
    assert "overlaps with active L2 table" in ours.err
    assert I.header(b).incompatible_features & C.INCOMPAT_CORRUPT
    assert I.u64(b, l1) == I.u64(a, l1) == l1 | C.OFLAG_COPIED  # the L1 entry was not rewritten


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repair_clears_unknown_autoclear_bits(qemu_tools, tmp_path, mode):
    """check -r opens the image read-write, which clears autoclear bits the writer does not know:
    the header is then byte-identical to qemu-img's."""
    src = clean_unknown_autoclear_bit(str(tmp_path / "src.qcow2"))
    a, b = str(tmp_path / "qemu.qcow2"), str(tmp_path / "ours.qcow2")
    shutil.copy(src, a)
    shutil.copy(src, b)
    _same(qcowpy_cli("check", "-r", mode, b), qemu_img("check", "-r", mode, a), f"check -r {mode}")
    assert I.header(b).autoclear_features == 0
    assert I.peek(a, 0, 512) == I.peek(b, 0, 512)
