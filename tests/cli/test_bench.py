"""``qcowpy bench`` against ``qemu-img bench`` (7.2's img_bench) and a model of its request schedule.

* option checks: the same bad command lines give the same stderr (modulo the program name), the
  same stdout and the same exit status as qemu-img;
* the schedule: a recording device sees exactly the model's requests (offsets wrapping around the
  image, sizes, data), never more than ``depth`` at once (and ``depth`` when the device is slow),
  and the model's flushes — the drained flush count is also qemu-img's own, counted with strace
  as the fdatasync calls its raw driver makes;
* the result on disk: what ``bench -w --pattern`` wrote is read back by qemu-io, and the image
  equals the one ``qemu-img bench`` makes from the same command line.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time

import pytest

import qcowpy
from qcowpy.block.device import BlockDevice
from qcowpy.tools.bench import BenchFailed, BenchSpec, run_bench

from conftest import skip_or_fail
from .helpers import as_qemu, qcowpy as run_qcowpy, qemu

SIZE = 1 << 20

BAD = [
    ["-c", "-1"], ["-c", "abc"], ["-c", "2147483648"], ["-c", "5x"], ["-c", ""], ["-c", "08"],
    ["-d", "x"], ["-d", "-3"], ["-d", "0x80000000"],
    ["-o", "-5"], ["-o", "1x"], ["-o", "9223372036854775808"],
    ["-s", "3G"], ["-s", "abc"], ["-s", "-1"], ["-S", "3G"], ["-S", "-1"], ["-S", "1.5"],
    ["--pattern=256"], ["--pattern=0x100"], ["--pattern=-1"], ["--pattern=x"],
    ["--flush-interval=x"], ["--flush-interval=2"], ["-w", "--flush-interval=2"],
    ["-w", "-d", "8", "--flush-interval=7"],
    ["-i", "foo"], ["-i", "posix"], ["-i", "native"], ["-n"], ["-n", "-t", "writeback"],
    ["-t", "bogus"], ["-t", ""],
    ["-U", "-w"], ["-U", "-w", "-n"],
    ["-x"], ["--object", "secret,id=s,data=x"], ["--bogus"],
    ["--image-opts", "-f", "qcow2"],
    ["-f", "bogus"],
    ["-c", "abc", "-d", "x"], ["-d", "x", "-c", "abc"], ["-i", "foo", "-t", "bogus"],
    ["-t", "bogus", "-c", "x"], ["-i", "native", "-i", "threads"], ["-n", "-t", "none", "-t", "writeback"],
    ["-c", "5", "-c", "x"], ["-c", "x", "-c", "5"],
]


def _image(tmp_path, name="t.qcow2", fmt="qcow2", size=SIZE):
    path = tmp_path / name
    assert run_qcowpy("create", "-q", "-f", fmt, path, str(size)).code == 0
    return path


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a) or "empty")
def test_bad_arguments_as_qemu_img(tmp_path, qemu_img, args):
    _image(tmp_path)
    want = qemu(qemu_img, "bench", "-c", "1", *args, "t.qcow2", cwd=tmp_path)
    got = run_qcowpy("bench", "-c", "1", *args, "t.qcow2", cwd=tmp_path)
    assert want.code == 1
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)


@pytest.mark.parametrize("args", [[], ["a", "b"], ["-c", "1", "nonexistent.qcow2"], ["-n", "nonexistent"],
                                  ["-U", "-w", "nonexistent"]], ids=lambda a: " ".join(a) or "none")
def test_usage_and_open_errors_as_qemu_img(tmp_path, qemu_img, args):
    want = qemu(qemu_img, "bench", *args, cwd=tmp_path)
    got = run_qcowpy("bench", *args, cwd=tmp_path)
    assert want.code == 1
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)


def _without_time(text: str) -> str:
    return re.sub(r"Run completed in [0-9]+\.[0-9]{3} seconds\.", "Run completed in T seconds.", text)


@pytest.mark.parametrize("args", [
    [], ["-c", "100"], ["-c", "010", "-d", "3"], ["-c", "0x20", "-s", "512", "-S", "1536", "-o", "4k"],
    ["-c", "7", "-q"], ["-c", "0"], ["-d", "0", "-c", "0"], ["-c", "9", "-s", "0"],
    ["-w", "-c", "50", "-d", "4", "--flush-interval=8"], ["-w", "-c", "50", "--flush-interval=64", "--no-drain"],
    ["-c", "3", "--no-drain"], ["-c", "3", "-t", "none", "-n"], ["-c", "3", "-t", "directsync", "-i", "native"],
    ["-c", "3", "-i", "threads"], ["-c", "3", "-i", "io_uring"], ["-c", "3", "-t", "unsafe", "-w"],
    ["-c", "3", "-U"], ["-c", "3", "-f", "raw"], ["-c", "3", "--force-share"],
    ["-c", "2", "-o", "1048575"], ["-c", "300", "-S", "3000"], ["-c", "2", "-o", "2M"],
    ["-c", "2", "-o", "1044480"],
], ids=lambda a: " ".join(a) or "defaults")
def test_output_and_status_as_qemu_img(tmp_path, qemu_img, args):
    _image(tmp_path)
    want = qemu(qemu_img, "bench", *args, "t.qcow2", cwd=tmp_path)
    got = run_qcowpy("bench", *args, "t.qcow2", cwd=tmp_path)
    assert (got.code, _without_time(got.out), as_qemu(got.err)) == \
        (want.code, _without_time(want.out), want.err)


def test_image_opts(tmp_path, qemu_img):
    _image(tmp_path)
    opts = "driver=qcow2,file.filename=t.qcow2"
    want = qemu(qemu_img, "bench", "-c", "5", "--image-opts", opts, cwd=tmp_path)
    got = run_qcowpy("bench", "-c", "5", "--image-opts", opts, cwd=tmp_path)
    assert want.code == got.code == 0
    assert _without_time(got.out) == _without_time(want.out)


# ------------------------------------------------------------------------------------- the schedule
class Recording(BlockDevice):
    """A device that records every request (and how many run at once) and passes it on."""

    def __init__(self, inner: BlockDevice, delay: float = 0.0):
        self.inner = inner
        self.format, self.filename, self.read_only = inner.format, inner.filename, inner.read_only
        self.delay = delay
        self.lock = threading.Lock()
        self.events: list[tuple] = []  # ("read"|"write", offset, length, data) or ("flush", writes done)
        self.running = 0
        self.max_running = 0
        self.flush_overlapped_writes = False

    @property
    def size(self) -> int:
        return self.inner.size

    def _enter(self):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        if self.delay:
            time.sleep(self.delay)

    def _leave(self, event):
        with self.lock:
            self.running -= 1
            self.events.append(event)

    def pread(self, length, offset):
        return self.inner.pread(length, offset)

    def preadinto(self, buf, offset):
        self._enter()
        self.inner.preadinto(buf, offset)
        self._leave(("read", offset, len(buf), None))

    def pwrite(self, data, offset):
        self._enter()
        self.inner.pwrite(data, offset)
        self._leave(("write", offset, len(data), bytes(set(bytes(data)))))

    def flush(self):
        with self.lock:
            if self.running:
                self.flush_overlapped_writes = True
            done = sum(1 for e in self.events if e[0] == "write")
        self.inner.flush()
        with self.lock:
            self.events.append(("flush", done))

    def write_zeroes(self, length, offset, unmap=False):
        raise AssertionError("bench never writes zeroes")

    def discard(self, length, offset):
        raise AssertionError("bench never discards")

    def truncate(self, size, preallocation="off"):
        raise AssertionError("bench never resizes")

    def layer_status(self, offset, length, max_extents=None):
        return self.inner.layer_status(offset, length, max_extents)

    def _close_self(self):
        self.inner.close()


def model_offsets(spec: BenchSpec, size: int) -> list[int]:
    """qemu-img's request offsets: start at -o, add the step, wrap at the image size."""
    out, off = [], spec.offset
    for _ in range(spec.count):
        out.append(off)
        off = (off + spec.stride) % size
    return out


def model_flushes(spec: BenchSpec) -> int:
    """Flushes qemu-img's bench_cb issues: one each time the number of requests not yet submitted
    is a multiple of the interval — once per such number when it drains first, and at every
    completion that sees it otherwise (the last ``depth`` completions all see 0)."""
    if not spec.flush_interval or not spec.count:
        return 0
    first = min(spec.count, spec.depth)
    steady = (spec.count - first) // spec.flush_interval
    return steady + (1 if spec.drain else first)


def _bench(tmp_path, spec: BenchSpec, fmt="qcow2", delay=0.0, workers=None, size=SIZE):
    path = _image(tmp_path, f"s.{fmt}", fmt, size)
    with qcowpy.open(str(path), "r+" if spec.write else "r") as inner:
        dev = Recording(inner, delay)
        run_bench(dev, spec, workers)
    return dev


SPECS = [  # (what to run, an image size where none of its requests reaches past the end)
    (BenchSpec(count=10, depth=1), SIZE),
    (BenchSpec(count=1000, depth=7, bufsize=2048, step=3072, offset=100), 3072 * 400),  # wraps twice
    (BenchSpec(count=1000, depth=16, bufsize=512, step=4096 * 3), SIZE),
    (BenchSpec(count=64, depth=64, bufsize=65536, step=0), SIZE),
    (BenchSpec(count=5, depth=64), SIZE),
    (BenchSpec(count=0, depth=4), SIZE),
    (BenchSpec(count=9, depth=3, bufsize=0), SIZE),
    (BenchSpec(count=50, depth=4, bufsize=4096, step=4096, offset=SIZE - 4096), SIZE),  # last block, then 0
]


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("spec,size", SPECS,
                         ids=lambda s: f"c{s.count}-d{s.depth}-s{s.bufsize}-S{s.step}-o{s.offset}"
                         if isinstance(s, BenchSpec) else str(s))
def test_requests_follow_the_model(tmp_path, spec, size, write):
    spec = BenchSpec(**{**spec.__dict__, "write": write, "pattern": 0x5A})
    assert all(o <= size and size - o >= spec.bufsize for o in model_offsets(spec, size)), "bad test case"
    dev = _bench(tmp_path, spec, size=size)
    kind = "write" if write else "read"
    seen = [e for e in dev.events if e[0] == kind]
    assert sorted(e[1] for e in seen) == sorted(model_offsets(spec, size))
    assert {e[2] for e in seen} <= {spec.bufsize}
    if write and spec.bufsize and spec.count:
        assert {e[3] for e in seen} == {b"\x5a"}
    assert [e for e in dev.events if e[0] != kind] == []
    assert dev.max_running <= max(1, spec.depth)
    if spec.depth == 1:  # one at a time: the exact order too
        assert [e[1] for e in seen] == model_offsets(spec, size)


def test_wraps_around_the_image(tmp_path):
    spec = BenchSpec(count=40, depth=4, bufsize=4096, step=65536, offset=8192)
    dev = _bench(tmp_path, spec)
    offsets = sorted(e[1] for e in dev.events)
    assert offsets == sorted(8192 + (i % 16) * 65536 for i in range(40))  # 1 MiB / 64 KiB = 16 slots


def test_depth_requests_in_flight(tmp_path):
    dev = _bench(tmp_path, BenchSpec(count=64, depth=8), delay=0.01)
    assert dev.max_running == 8
    dev = _bench(tmp_path, BenchSpec(count=64, depth=1), delay=0.002)
    assert dev.max_running == 1


@pytest.mark.parametrize("count,depth,interval", [(100, 4, 8), (100, 4, 7), (3, 4, 8), (100, 8, 8), (64, 64, 64),
                                                  (65, 16, 16), (1, 1, 1), (200, 1, 1)])
@pytest.mark.parametrize("drain", [True, False], ids=["drain", "no-drain"])
def test_flushes_follow_the_model(tmp_path, count, depth, interval, drain):
    spec = BenchSpec(count=count, depth=depth, write=True, flush_interval=interval, drain=drain)
    dev = _bench(tmp_path, spec)
    flushes = [e for e in dev.events if e[0] == "flush"]
    assert len(flushes) == model_flushes(spec)
    assert sum(1 for e in dev.events if e[0] == "write") == count
    if drain:  # the queue is empty at every flush, after exactly count - r writes (r: a multiple)
        assert not dev.flush_overlapped_writes
        first = min(count, depth)
        assert [e[1] for e in flushes] == [count - r for r in range(count - first, -1, -1) if r % interval == 0]


def _strace() -> str:
    path = shutil.which("strace")
    if path is None:
        skip_or_fail("strace is")
    return path


@pytest.mark.parametrize("count,depth,interval", [(100, 4, 8), (100, 4, 7), (3, 4, 8), (100, 8, 8), (50, 1, 1)])
def test_drained_flushes_as_qemu_img(tmp_path, qemu_img, count, depth, interval):
    """qemu-img's raw driver turns each flush that follows writes into one fdatasync: count them."""
    strace = _strace()
    img = _image(tmp_path, "r.raw", "raw")
    trace = tmp_path / "trace"
    args = ["bench", "-w", "-f", "raw", "-c", str(count), "-d", str(depth), f"--flush-interval={interval}"]
    subprocess.run([strace, "-f", "-qq", "-e", "trace=fdatasync,fsync", "-o", str(trace), qemu_img, *args, str(img)],
                   check=True, capture_output=True)
    qemu_flushes = len(re.findall(r"\b(fdatasync|fsync)\(", trace.read_text()))
    spec = BenchSpec(count=count, depth=depth, write=True, flush_interval=interval)
    dev = _bench(tmp_path, spec, fmt="raw")
    assert qemu_flushes == model_flushes(spec) == sum(1 for e in dev.events if e[0] == "flush")


def test_writethrough_flushes_every_write(tmp_path):
    spec = BenchSpec(count=20, depth=4, write=True, writethrough=True)
    dev = _bench(tmp_path, spec)
    assert sum(1 for e in dev.events if e[0] == "flush") == 20


def test_request_past_the_end_fails_with_eio(tmp_path):
    with pytest.raises(BenchFailed, match="^Failed request: Input/output error$"):
        _bench(tmp_path, BenchSpec(count=1000, depth=4, step=3000))


# ------------------------------------------------------------------------------------- on disk
@pytest.mark.parametrize("args", [
    ["-c", "100", "--pattern=0xAB"],
    ["-c", "700", "-d", "5", "-S", "6144", "-s", "1000", "-o", "3k", "--pattern=171"],
    ["-c", "64", "-s", "64k", "-S", "128k", "--pattern=0xab", "--flush-interval=64"],
    ["-c", "300", "-d", "16", "-S", "3000", "-s", "512", "--pattern=0253", "--flush-interval=32", "--no-drain"],
], ids=lambda a: " ".join(a))
def test_written_data_as_qemu_img_writes_it(tmp_path, qemu, args):
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    qemu.create(ours, SIZE)
    qemu.create(theirs, SIZE)
    got = run_qcowpy("bench", "-w", *args, ours)
    assert got.code == 0, got.err
    assert qemu.img("bench", "-w", *args, theirs).returncode == 0
    qemu.assert_clean(ours)
    assert qemu.compare(ours, theirs, strict=True).returncode == 0
    # and every request's bytes read back as the pattern, through qemu-io
    opts = dict(zip(args[::2], args[1::2]))
    count, size = int(opts["-c"]), qcowpy_size(opts.get("-s", "4096"))
    step, offset = qcowpy_size(opts.get("-S", str(size))), qcowpy_size(opts.get("-o", "0"))
    spec = BenchSpec(count=count, bufsize=size, step=step, offset=offset)
    for off in sorted(set(model_offsets(spec, SIZE)))[:50]:
        qemu.io(str(ours), f"read -P 0xab {off} {size}")
    pattern = bytearray(SIZE)
    for off in model_offsets(spec, SIZE):
        pattern[off:off + size] = b"\xab" * size
    with qcowpy.open(str(ours)) as dev:
        assert dev.pread(SIZE, 0) == bytes(pattern)


def qcowpy_size(text: str) -> int:
    from qcowpy.units import strtosz
    return strtosz(text)


def test_written_pattern_read_by_qemu_io(tmp_path, qemu):
    img = tmp_path / "p.qcow2"
    qemu.create(img, SIZE)
    r = run_qcowpy("bench", "-w", "--pattern=0xAB", "-c", "16", "-d", "4", "-s", "64k", img)
    assert r.code == 0 and r.err == "", r.err
    qemu.io(str(img), f"read -P 0xab 0 {SIZE}")
    qemu.assert_clean(img)
