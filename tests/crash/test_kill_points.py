"""SIGKILL at every write of a whole qcowpy command (strace's syscall injection), judged by qemu-img.

``strace -e inject=pwrite64:signal=SIGKILL:when=K`` kills the process as it is about to make its
K-th ``pwrite``; K runs from 1 until the command completes. After each kill ``qemu-img check``
must find at most leaks, and what the command promised must hold: the disk reads either as
before or as after (each snapshot too). QEMU 7.2's own snapshot operations leave OFLAG_COPIED
corruption at some of these points (docs/reliability.md); ours may not.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import skip_or_fail

MiB = 1 << 20


@pytest.fixture(scope="module")
def strace() -> str:
    path = shutil.which("strace")
    if path is None:
        skip_or_fail("strace is")
    return path


def _qcowpy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "qcowpy.cli.main", *args]


def _run_killed(strace: str, k: int, argv: list[str]) -> int:
    """Run ``argv`` under strace, SIGKILLed at its ``k``-th pwrite64; its exit status."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([strace, "-f", "-o", os.devnull, "-e", "trace=pwrite64",
                        "-e", f"inject=pwrite64:signal=SIGKILL:when={k}", *argv],
                       capture_output=True, env=env)
    return p.returncode


def _img(qemu_img: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([qemu_img, *map(str, args)], capture_output=True, text=True)


def _state(qemu_img: str, path, tmp) -> tuple:
    """What a reader sees: the active disk's bytes, and each snapshot's name and bytes."""
    raw = tmp / "state.raw"
    assert _img(qemu_img, "convert", "-U", "-O", "raw", path, raw).returncode == 0
    disks = [raw.read_bytes()]
    info = json.loads(_img(qemu_img, "info", "-U", "--output=json", path).stdout)
    for sn in info.get("snapshots", []):
        assert _img(qemu_img, "convert", "-U", "-l", f"snapshot.id={sn['id']}", "-O", "raw", path, raw).returncode == 0
        disks.append((sn["name"], raw.read_bytes()))
    return tuple(disks)


def _sweep_each(strace: str, prepare, argv, judge, limit: int = 300) -> int:
    """Kill ``argv`` (a list, or a callable of the prepared paths) at its 1st, 2nd, ... write,
    each time on files ``prepare()`` makes afresh, and ``judge(paths, k, completed)`` each
    result; returns the number of kill points (the last one is the run that completed)."""
    for k in range(1, limit + 1):
        paths = prepare()
        rc = _run_killed(strace, k, argv(paths) if callable(argv) else argv)
        judge(paths, k, rc == 0)
        if rc == 0:
            return k
    pytest.fail(f"{argv} did not complete within {limit} writes")


def _check_at_most_leaks(qemu_img: str, path, what: str) -> int:
    check = _img(qemu_img, "check", path)
    assert check.returncode in (0, 3), f"{what}: {check.stdout}{check.stderr}"
    return check.returncode


def _sweep(strace: str, qemu_img: str, tmp, base, argv_of, accept, view=None) -> int:
    """Kill ``argv_of(image)`` at every write on fresh copies of ``base``: at most leaks, and
    ``accept(state, before, completed, what)`` judges what a reader then sees (``view``, by
    default _state)."""
    view = view or _state
    before = view(qemu_img, base, tmp)
    img = tmp / "killed.qcow2"

    def prepare():
        shutil.copy(base, img)
        return img

    def judge(path, k, completed):
        what = f"{argv_of(path)[3:]} killed at write {k}"
        _check_at_most_leaks(qemu_img, path, what)
        accept(view(qemu_img, path, tmp), before, completed, what)

    return _sweep_each(strace, prepare, argv_of, judge)


def _before_or_after(qemu_img: str, tmp, base, args: list[str]):
    """``accept`` for an operation that must look done or not done: the disk and every snapshot
    read as before or as after (as after once it completed)."""
    done = tmp / "done.qcow2"
    shutil.copy(base, done)
    assert subprocess.run(_qcowpy_argv(*args, str(done)), capture_output=True).returncode == 0
    after = _state(qemu_img, done, tmp)

    def accept(state, before, completed, what):
        assert state == after if completed else state in (before, after), \
            f"{what}: the disk reads neither as before nor as after"
    return accept


@pytest.fixture
def snapshotted(tmp_path, qemu_img):
    """An image with data in two L2 tables, one snapshot, then more writes (shared and owned clusters)."""
    p = tmp_path / "base.qcow2"
    assert _img(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p, "8M").returncode == 0
    io = shutil.which("qemu-io") or os.path.join(os.path.dirname(qemu_img), "qemu-io")
    subprocess.run([io, "-f", "qcow2", "-c", "write -P 1 0 256k", "-c", "write -P 2 3M 64k", str(p)],
                   check=True, capture_output=True)
    assert subprocess.run(_qcowpy_argv("snapshot", "-c", "s1", str(p)), capture_output=True).returncode == 0
    subprocess.run([io, "-f", "qcow2", "-c", "write -P 3 0 8k", "-c", "write -c -P 4 6M 4k", str(p)],
                   check=True, capture_output=True)
    return p


@pytest.mark.parametrize("args", [["snapshot", "-c", "s2"], ["snapshot", "-a", "s1"], ["snapshot", "-d", "s1"]],
                         ids=lambda a: " ".join(a))
def test_snapshot_operations_survive_every_kill_point(tmp_path, qemu_img, strace, snapshotted, args):
    accept = _before_or_after(qemu_img, tmp_path, snapshotted, args)
    points = _sweep(strace, qemu_img, tmp_path, snapshotted, lambda p: _qcowpy_argv(*args, str(p)), accept)
    assert points > 3  # the sweep really cut the operation at several writes


@pytest.mark.parametrize("args,prefix", [
    (["resize", "--preallocation=metadata"], None), (["resize", "--preallocation=falloc"], None),
    (["resize", "--preallocation=full"], None), (["resize", "--shrink"], 2 * MiB)],
    ids=["metadata", "falloc", "full", "shrink"])
def test_resize_survives_every_kill_point(tmp_path, qemu_img, strace, snapshotted, args, prefix):
    """Growing with preallocation maps new clusters (the file must reach them before any L2
    entry does: a crash used to leave entries past the end of the file, which no repair fixes);
    shrinking drops clusters and L2 tables past the new end."""
    base = tmp_path / "nosnap.qcow2"
    assert _img(qemu_img, "convert", "-O", "qcow2", "-o", "cluster_size=4k", snapshotted, base).returncode == 0
    size = "+6M" if prefix is None else "2M"

    def accept(state, before, completed, what):
        active, old = state[0], before[0]
        n = prefix if prefix is not None else len(old)
        assert active[:n] == old[:n], f"{what}: data inside the kept size changed"
        if prefix is None:  # growing: the new area reads as zeros
            assert not active[n:].strip(b"\0"), f"{what}: the grown area does not read as zeros"
        else:  # shrinking: each dropped cluster still reads as before, or already as zeros
            for off in range(n, len(active), 4096):
                piece = active[off:off + 4096]
                assert piece in (old[off:off + 4096], bytes(len(piece))), f"{what}: offset {off}"

    assert _sweep(strace, qemu_img, tmp_path, base, lambda p: _qcowpy_argv(*args, str(p), size), accept) > 2


@pytest.fixture
def chain(tmp_path, qemu_img):
    """base.qcow2 <- top.qcow2, both with data (top overwrites part of base, zeroes some)."""
    io = shutil.which("qemu-io") or os.path.join(os.path.dirname(qemu_img), "qemu-io")
    base, top = tmp_path / "base0.qcow2", tmp_path / "top0.qcow2"
    assert _img(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "8M").returncode == 0
    subprocess.run([io, "-f", "qcow2", "-c", "write -P 1 0 1M", "-c", "write -P 5 5M 64k", str(base)],
                   check=True, capture_output=True)
    shutil.copy(base, tmp_path / "base.qcow2")  # the name top0 refers to
    assert _img(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2",
                top, "8M").returncode == 0
    subprocess.run([io, "-f", "qcow2", "-c", "write -P 2 512k 1M", "-c", "write -z 5M 4k", str(top)],
                   check=True, capture_output=True)
    return base, top


def _chain_sweep(strace, qemu_img, tmp, chain, args: list[str]) -> int:
    """Kill ``qcowpy args top.qcow2`` over a two-image chain: both images check with at most
    leaks and the guest view through top is unchanged at every kill point."""
    base0, top0 = chain
    base, top = tmp / "base.qcow2", tmp / "top.qcow2"
    shutil.copy(base0, base)
    shutil.copy(top0, top)
    view = _state(qemu_img, top, tmp)[0]

    def prepare():
        shutil.copy(base0, base)
        shutil.copy(top0, top)
        return top

    def judge(path, k, completed):
        what = f"{args} killed at write {k}"
        for p in (top, base):
            _check_at_most_leaks(qemu_img, p, f"{what} ({p.name})")
        assert _state(qemu_img, top, tmp)[0] == view, f"{what}: the guest view through top changed"

    return _sweep_each(strace, prepare, lambda p: _qcowpy_argv(*args, str(p)), judge)


def test_commit_survives_every_kill_point(tmp_path, qemu_img, strace, chain):
    """Committing copies top into base, then empties top atomically (two header switches)."""
    assert _chain_sweep(strace, qemu_img, tmp_path, chain, ["commit"]) > 3


def test_rebase_survives_every_kill_point(tmp_path, qemu_img, strace, chain):
    other = tmp_path / "other.qcow2"
    assert _img(qemu_img, "create", "-q", "-f", "qcow2", other, "8M").returncode == 0
    assert _chain_sweep(strace, qemu_img, tmp_path, chain, ["rebase", "-b", "other.qcow2", "-F", "qcow2"]) > 1


def test_interrupted_repair_is_repaired_by_the_next(tmp_path, qemu_img, strace, snapshotted):
    """check -r all killed at any write leaves an image that the next check -r all repairs
    (here one whose refcount structure must be rebuilt: an L2 table's refcount is 0)."""
    import struct
    damaged = tmp_path / "damaged.qcow2"
    data = bytearray(snapshotted.read_bytes())
    rt_off, = struct.unpack_from(">Q", data, 48)
    block, = struct.unpack_from(">Q", data, rt_off)
    l1_off, = struct.unpack_from(">Q", data, 40)
    l2 = struct.unpack_from(">Q", data, l1_off)[0] & 0x00FFFFFFFFFFFE00
    struct.pack_into(">H", data, block + 2 * (l2 >> 12), 0)
    damaged.write_bytes(bytes(data))
    assert _img(qemu_img, "check", damaged).returncode == 2
    img = tmp_path / "killed.qcow2"

    def prepare():
        shutil.copy(damaged, img)
        return img

    def judge(path, k, completed):
        subprocess.run(_qcowpy_argv("check", "-r", "all", str(path)), capture_output=True)
        check = _img(qemu_img, "check", path)
        assert check.returncode == 0, f"check -r all killed at write {k}, then run again: {check.stdout}"

    assert _sweep_each(strace, prepare, lambda p: _qcowpy_argv("check", "-r", "all", str(p)), judge) > 1


@pytest.mark.parametrize("opts", [["-O", "qcow2"], ["-c", "-O", "qcow2"]], ids=["plain", "compressed"])
def test_convert_survives_every_kill_point(tmp_path, qemu_img, strace, snapshotted, opts):
    """A killed convert leaves its source alone and a target that is either not yet a qcow2
    file (killed before the first header write) or one with at most leaks."""
    source = tmp_path / "source.qcow2"
    shutil.copy(snapshotted, source)
    before = source.read_bytes()
    target = tmp_path / "target.qcow2"

    def prepare():
        target.unlink(missing_ok=True)
        return target

    def judge(path, k, completed):
        assert source.read_bytes() == before, f"convert killed at write {k} changed its source"
        if path.stat().st_size == 0:
            assert not completed
            return
        _check_at_most_leaks(qemu_img, path, f"convert {opts} killed at write {k}")
        if completed:
            assert _img(qemu_img, "compare", source, path).returncode == 0

    argv = _qcowpy_argv("convert", *opts, str(source), str(target))
    assert _sweep_each(strace, prepare, argv, judge) > 2


# ------------------------------------------------------------------ external data files and amend
_DATA_FILE_WORKLOAD = """
import sys, qcowpy
with qcowpy.open(sys.argv[1], "r+") as d:
    d.pwrite(b"\\x11" * 300000, 0)
    d.write_zeroes(65536, 65536)
    d.pwrite(b"\\x22" * 70000, 1000000)
    d.flush()
    d.write_zeroes(131072, 1048576, unmap=True)
    d.discard(65536, 2 * 65536)
    d.pwrite(b"\\x33" * 4096, 3000000)
"""


@pytest.mark.parametrize("raw", [False, True], ids=["data_file", "data_file_raw"])
def test_data_file_writes_survive_every_kill_point(tmp_path, qemu_img, strace, raw, monkeypatch):
    """Guest writes, zero writes and discards on an image whose data live in an external data
    file: killed at any write (of either file), the image checks with at most leaks and every
    cluster reads as before or as written."""
    monkeypatch.chdir(tmp_path)
    opts = "data_file=d0.raw" + (",data_file_raw=on" if raw else "")
    assert _img(qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, "base.qcow2", "4M").returncode == 0
    io = shutil.which("qemu-io") or os.path.join(os.path.dirname(qemu_img), "qemu-io")
    subprocess.run([io, "-f", "qcow2", "-c", "write -P 0x55 0 4M", "base.qcow2"], check=True, capture_output=True)
    before = _state(qemu_img, "base.qcow2", tmp_path)[0]
    img = tmp_path / "killed.qcow2"
    header = (tmp_path / "base.qcow2").read_bytes()

    def prepare():
        shutil.copy(tmp_path / "d0.raw", tmp_path / "d1.raw")
        # the same image naming d1.raw (same name length, so the header stays the same size)
        img.write_bytes(header.replace(b"d0.raw", b"d1.raw", 1))
        return img

    def judge(path, k, completed):
        what = f"data-file workload killed at write {k}"
        _check_at_most_leaks(qemu_img, path, what)
        active = _state(qemu_img, path, tmp_path)[0]
        for off in range(0, len(active), 4096):
            piece, old = active[off:off + 4096], before[off:off + 4096]
            assert len(set(piece)) == 1 or piece == old or set(piece) <= {0, 0x11, 0x22, 0x33, 0x55}, what

    argv = [sys.executable, "-c", _DATA_FILE_WORKLOAD]
    assert _sweep_each(strace, prepare, lambda p: argv + [str(p)], judge) > 5


@pytest.fixture
def amendable(tmp_path, qemu_img):
    """A v3 image with data, zero clusters (plain and preallocated), compressed clusters, over a backing file."""
    io = shutil.which("qemu-io") or os.path.join(os.path.dirname(qemu_img), "qemu-io")
    base = tmp_path / "b.qcow2"
    assert _img(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, "4M").returncode == 0
    subprocess.run([io, "-f", "qcow2", "-c", "write -P 9 0 4M", str(base)], check=True, capture_output=True)
    p = tmp_path / "amend0.qcow2"
    assert _img(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "b.qcow2", "-F", "qcow2",
                p, "4M").returncode == 0
    subprocess.run([io, "-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -z 64k 32k", "-c", "write -P 2 1M 32k",
                    "-c", "write -z 1M 16k", "-c", "write -c -P 3 2M 16k", str(p)], check=True, capture_output=True)
    return p


AMENDS = [["amend", "-o", "refcount_bits=4"], ["amend", "-o", "refcount_bits=64"], ["amend", "-o", "compat=0.10"]]


@pytest.mark.parametrize("args", AMENDS, ids=lambda a: a[-1])
def test_amend_survives_every_kill_point(tmp_path, qemu_img, strace, amendable, args):
    """amend keeps the disk as it reads (killed anywhere: at most leaks, same contents)."""
    accept = _before_or_after(qemu_img, tmp_path, amendable, args)
    points = _sweep(strace, qemu_img, tmp_path, amendable, lambda p: _qcowpy_argv(*args, str(p)), accept)
    print(f"\nqcowpy {' '.join(args)}: {points} kill points, all at most leaks")
    assert points > 3


@pytest.mark.parametrize("args", AMENDS, ids=lambda a: a[-1])
def test_qemu_img_amend_kill_points_measured(tmp_path, qemu_img, strace, amendable, args):
    """The same sweep over ``qemu-img amend`` (QEMU 7.2), for docs/reliability.md: counts the
    kill points after which ``qemu-img check`` reports corruption (not just leaks) or the disk
    reads differently. Asserts only that the sweep ran and that the counts are reported."""
    before = _state(qemu_img, amendable, tmp_path)
    img = tmp_path / "qkilled.qcow2"
    bad: list[int] = []

    def prepare():
        shutil.copy(amendable, img)
        return img

    def judge(path, k, completed):
        check = _img(qemu_img, "check", path)
        ok = check.returncode in (0, 3)
        if ok:
            conv = _img(qemu_img, "convert", "-U", "-O", "raw", path, tmp_path / "q.raw")
            ok = conv.returncode == 0 and (tmp_path / "q.raw").read_bytes() == before[0]
        if not ok:
            bad.append(k)

    points = _sweep_each(strace, prepare, [qemu_img, *args, str(img)], judge)
    print(f"\nqemu-img {' '.join(args)}: {points} kill points, {len(bad)} left corruption or changed data: {bad}")
    assert points >= 3


def _bitmap_view(qemu_img: str, path, tmp=None) -> dict[str, object]:
    """What QEMU sees of each bitmap: "in-use" (inconsistent), or its flags and dirty ranges."""
    from tests.bitmaps.oracle import dirty_map
    info = json.loads(_img(qemu_img, "info", "-U", "--output=json", path).stdout)
    out: dict[str, object] = {}
    for bm in info.get("format-specific", {}).get("data", {}).get("bitmaps", []):
        out[bm["name"]] = "in-use" if "in-use" in bm["flags"] else (tuple(bm["flags"]), bm["granularity"],
                                                                     tuple(dirty_map(path, bm["name"])))
    return out


@pytest.fixture
def with_bitmaps(tmp_path, qemu_img):
    """An image with data, two enabled bitmaps and a disabled one, all made by QEMU."""
    p = tmp_path / "bitmaps.qcow2"
    assert _img(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", p, "8M").returncode == 0
    for args in (["-g", "4k", "b1"], ["b2"], ["--disable", "b3"]):
        assert _img(qemu_img, "bitmap", "--add", *args[:-1], p, args[-1]).returncode == 0
    io = shutil.which("qemu-io") or os.path.join(os.path.dirname(qemu_img), "qemu-io")
    subprocess.run([io, "-f", "qcow2", "-c", "write -P 1 0 256k", "-c", "write -P 2 3M 64k", str(p)],
                   check=True, capture_output=True)
    return p


@pytest.mark.parametrize("args", [["bitmap", "--add", "-g", "8k", "IMG", "new"], ["bitmap", "--remove", "IMG", "b2"],
                                  ["bitmap", "--merge", "b1", "--enable", "IMG", "b3"], ["resize", "IMG", "+1M"],
                                  ["convert", "-n", "-O", "qcow2", "SRC", "IMG"]],
                         ids=lambda a: " ".join(a[:2]))
def test_storing_bitmaps_survives_every_kill_point(tmp_path, qemu_img, strace, with_bitmaps, args):
    """Storing bitmaps at close writes new tables and a new directory, then switches the header,
    then frees the old clusters: a kill at any write leaves at most leaks, and QEMU sees each
    bitmap either in_use (the image was open for writing), or exactly as before or as after."""
    src = tmp_path / "src.qcow2"
    assert _img(qemu_img, "create", "-q", "-f", "qcow2", src, "8M").returncode == 0
    subprocess.run([shutil.which("qemu-io") or "qemu-io", "-f", "qcow2", "-c", "write -P 7 1M 100k", str(src)],
                   check=True, capture_output=True)
    base = with_bitmaps

    def argv(p):
        return _qcowpy_argv(*[str(p) if a == "IMG" else str(src) if a == "SRC" else a for a in args])

    done = tmp_path / "done.qcow2"
    shutil.copy(base, done)
    assert subprocess.run(argv(done), capture_output=True).returncode == 0
    after = _bitmap_view(qemu_img, done)
    assert _bitmap_view(qemu_img, base) != after or args[0] == "resize"  # resize: same bits, tables sized anew

    def accept(seen, before, completed, what):
        if completed:
            assert seen == after, what
            return
        if seen.keys() not in (before.keys(), after.keys()):
            pytest.fail(f"{what}: bitmaps {sorted(seen)}, neither {sorted(before)} nor {sorted(after)}")
        for name, view in seen.items():
            assert view == "in-use" or view in (before.get(name), after.get(name)), f"{what}: {name} {view}"

    assert _sweep(strace, qemu_img, tmp_path, base, argv, accept, view=_bitmap_view) > 3
