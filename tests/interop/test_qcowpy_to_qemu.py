"""qcowpy writes, QEMU checks: random workloads (hypothesis state machines) against a bytearray model.

After every run: `qemu-img check` finds no errors and no leaks (exit 0), `qemu-img compare`
against the model's raw image says identical, and qcowpy reads the model back.
"""
from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule, run_state_machine_as_test

import qcowpy
from qcowpy.format import constants as C
from qcowpy.format.header import parse_header

from .helpers import assert_map_like_qemu, assert_same_bytes

pytestmark = pytest.mark.interop

KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Config:
    cluster_size: int
    refcount_bits: int = 16
    compat: str = "1.1"
    compression: str = "zlib"
    backing: str | None = None  # None, "qcow2", "raw"
    backing_short: bool = False  # backing file shorter than the overlay
    lazy: bool = False
    extended_l2: bool = False

    @property
    def v3(self) -> bool:
        return self.compat == "1.1"

    @property
    def size(self) -> int:
        # enough clusters to cross an L2 table boundary where that stays small; a partial last cluster
        n = {512: 100, 4096: 560, 16384: 100, 65536: 40, 2 * MiB: 4}[self.cluster_size]
        return n * self.cluster_size + 1536

    def id(self) -> str:
        s = f"cs{self.cluster_size}-rb{self.refcount_bits}-v{3 if self.v3 else 2}-{self.compression}"
        if self.backing:
            s += f"-{self.backing}{'short' if self.backing_short else ''}"
        if self.lazy:
            s += "-lazy"
        if self.extended_l2:
            s += "-extl2"
        return s


CONFIGS = [
    Config(65536),
    Config(65536, compat="0.10"),
    Config(512, refcount_bits=1, compression="zstd"),
    Config(512, refcount_bits=64),
    Config(512, compat="0.10", backing="qcow2"),
    Config(4096, refcount_bits=64, backing="qcow2"),
    Config(4096, refcount_bits=1, backing="qcow2", backing_short=True),
    Config(4096, compat="0.10", backing="raw", backing_short=True),
    Config(4096, refcount_bits=4, compression="zstd", lazy=True),
    Config(65536, refcount_bits=2, lazy=True, backing="qcow2", backing_short=True),
    Config(65536, refcount_bits=32, compression="zstd", backing="raw"),
    Config(2 * MiB, refcount_bits=8, compression="zstd"),
    Config(2 * MiB, compat="0.10", backing="raw"),
    # extended L2 (subclusters): run only once qcowpy writes them (see extended_l2_writable)
    Config(65536, extended_l2=True),
    Config(16384, refcount_bits=8, extended_l2=True, backing="qcow2", backing_short=True),
    Config(2 * MiB, compression="zstd", extended_l2=True, backing="raw"),
]

TORTURE_CONFIGS = [Config(cs, rb, compat, ct, bk, short, lazy)
                   for cs in (512, 4096, 65536, 2 * MiB)
                   for rb, compat in [(1, "1.1"), (2, "1.1"), (8, "1.1"), (16, "1.1"), (64, "1.1"), (16, "0.10")]
                   for ct in (["zlib", "zstd"] if compat == "1.1" else ["zlib"])
                   for bk, short in [(None, False), ("qcow2", True), ("raw", False)]
                   for lazy in ([False, True] if compat == "1.1" and bk is None else [False])]
TORTURE_CONFIGS += [Config(cs, rb, "1.1", ct, bk, short, False, True)
                    for cs in (16384, 65536, 2 * MiB) for rb in (1, 16, 64) for ct in ("zlib", "zstd")
                    for bk, short in [(None, False), ("qcow2", True), ("raw", False)]]


def make_data(kind: int, n: int, seed: int) -> bytes:
    """Payloads of three compressibilities: random, repetitive text, and mostly zeros."""
    rng = random.Random(seed)
    if kind == 0:
        return rng.randbytes(n)
    if kind == 1:
        return (b"qcowpy %08x " % seed * (n // 16 + 1))[:n]
    out = bytearray(n)
    for _ in range(3):
        p = rng.randrange(n)
        out[p] = rng.randrange(1, 256)
    return bytes(out)


_BACKING_CACHE: dict[Config, tuple[str, bytes]] = {}
_SCRATCH: list[str] = []


def _scratch() -> str:
    """One scratch directory per test session, removed at exit (hypothesis may build machines
    whose teardown never runs)."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="qcowpy-interop-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


def backing_for(qemu, cfg: Config, workdir: str) -> tuple[str | None, bytes | None]:
    """A backing file QEMU wrote (kept for the session) and its guest contents."""
    if not cfg.backing:
        return None, None
    key = Config(cfg.cluster_size, backing=cfg.backing, backing_short=cfg.backing_short)
    if key not in _BACKING_CACHE:
        size = cfg.size - (cfg.size // 3 if cfg.backing_short else 0)
        size &= ~511
        d = tempfile.mkdtemp(prefix="backing-", dir=_scratch())
        rng = random.Random(size)
        content = bytearray(size)
        step = max(cfg.cluster_size // 2, 4096)
        for off in range(0, size, step * 2):  # every other half-cluster has data
            n = min(step, size - off)
            content[off:off + n] = rng.randbytes(n)
        raw = os.path.join(d, "base.raw")
        with open(raw, "wb") as f:
            f.write(content)
        if cfg.backing == "raw":
            path = raw
        else:
            path = os.path.join(d, "base.qcow2")
            qemu.img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536", raw, path)
        _BACKING_CACHE[key] = (path, bytes(content))
    path, content = _BACKING_CACHE[key]
    return path, content


def verify_against_qemu(qemu, img: str, model: bytes, workdir: str, extended_l2: bool = False) -> None:
    qemu.assert_clean(img)
    # (extended L2: known block_status deviation on the offsets of reserved, unallocated
    # subclusters, see test_qemu_to_qcowpy.test_extended_l2)
    assert_map_like_qemu(qemu, img)
    raw = os.path.join(workdir, "model.raw")
    with open(raw, "wb") as f:
        f.write(model)
    p = qemu.compare(img, raw, fmt_a="qcow2", fmt_b="raw")
    assert p.returncode == 0, f"qemu-img compare: {p.stdout}{p.stderr}"
    with qcowpy.open(img) as dev:
        assert_same_bytes(dev.pread(dev.size, 0), model, "qcowpy read-back")
    with open(img, "rb") as f:
        h = parse_header(f.read(4096))
    assert not h.incompatible_features & C.INCOMPAT_DIRTY  # clean close cleared the lazy-refcounts dirty bit


class ImageMachine(RuleBasedStateMachine):
    """Operations on a qcowpy image mirrored on a bytearray model."""

    cfg: Config
    qemu = None

    def __init__(self):
        super().__init__()
        self.workdir = tempfile.mkdtemp(prefix="sm-", dir=_scratch())
        self.path = os.path.join(self.workdir, "img.qcow2")
        cfg = self.cfg
        bpath, bdata = backing_for(self.qemu, cfg, self.workdir)
        opts = dict(cluster_size=cfg.cluster_size, refcount_bits=cfg.refcount_bits, compat=cfg.compat,
                    compression_type=cfg.compression, lazy_refcounts=cfg.lazy, extended_l2=cfg.extended_l2)
        if bpath:
            opts.update(backing_file=bpath, backing_fmt=cfg.backing)
        qcowpy.create(self.path, cfg.size, **opts)
        self.size = cfg.size
        self.cs = cfg.cluster_size
        self.backing_data = (bdata or b"")[:self.size]
        self.model = bytearray(self.size)
        self.model[:len(self.backing_data)] = self.backing_data
        self.dev = qcowpy.open(self.path, "r+")

    # --- helpers
    def _range(self, data):
        pass

    @staticmethod
    def offsets(cfg: Config):
        """Offsets biased to cluster boundaries and the image end."""
        n = cfg.size // cfg.cluster_size
        cs = cfg.cluster_size
        return st.one_of(
            st.integers(0, n).map(lambda i: i * cs),
            st.tuples(st.integers(0, n), st.sampled_from([1, 511, 512, cs // 2, cs - 512, cs - 1]))
            .map(lambda t: t[0] * cs + t[1]),
            st.integers(0, cfg.size - 1),
        ).map(lambda o: min(o, cfg.size - 1))

    def _clip(self, off: int, n: int) -> int:
        return max(0, min(n, self.size - off))

    def _discard_model(self, off: int, n: int) -> None:
        cs = self.cs
        start = (off + cs - 1) // cs * cs
        end = off + n if off + n == self.size else (off + n) // cs * cs
        for c in range(start, end, cs):
            e = min(c + cs, self.size)
            if self.cfg.v3 or not self.cfg.backing:
                self.model[c:e] = bytes(e - c)
            # v2 with a backing file: QEMU ignores the discard (no zero flag), and so do we

    # --- rules
    @rule(data=st.data(), kind=st.integers(0, 2), seed=st.integers(0, 1 << 30))
    def write(self, data, kind, seed):
        off = data.draw(self.offsets(self.cfg), label="off")
        n = self._clip(off, data.draw(st.integers(1, 3 * self.cs + 700), label="len"))
        buf = make_data(kind, n, seed)
        self.dev.pwrite(buf, off)
        self.model[off:off + n] = buf

    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data, unmap):
        off = data.draw(self.offsets(self.cfg), label="off")
        n = self._clip(off, data.draw(st.integers(1, 4 * self.cs), label="len"))
        self.dev.write_zeroes(n, off, unmap=unmap)
        self.model[off:off + n] = bytes(n)

    @rule(data=st.data())
    def discard(self, data):
        off = data.draw(self.offsets(self.cfg), label="off")
        n = self._clip(off, data.draw(st.integers(1, 4 * self.cs), label="len"))
        self.dev.discard(n, off)
        self._discard_model(off, n)

    @rule(data=st.data(), kind=st.integers(0, 2), seed=st.integers(0, 1 << 30))
    def write_compressed(self, data, kind, seed):
        nclusters = (self.size + self.cs - 1) // self.cs
        idx = data.draw(st.integers(0, nclusters - 1), label="cluster")
        off = idx * self.cs
        n = min(self.cs, self.size - off)
        buf = make_data(kind, n, seed)
        self.dev.write_compressed(buf, off)
        self.model[off:off + n] = buf

    @rule()
    def flush(self):
        self.dev.flush()

    @rule()
    def reopen(self):
        self.dev.close()
        self.dev = qcowpy.open(self.path, "r+")

    @rule(data=st.data())
    def read(self, data):
        off = data.draw(self.offsets(self.cfg), label="off")
        n = self._clip(off, data.draw(st.integers(0, 3 * self.cs), label="len"))
        assert self.dev.pread(n, off) == bytes(self.model[off:off + n])

    @precondition(lambda self: self.cfg.lazy)
    @rule()
    def lazy_dirty_bit_is_set_while_writing(self):
        self.dev.pwrite(b"\x5a", 0)
        self.model[0] = 0x5A
        with open(self.path, "rb") as f:
            h = parse_header(f.read(4096))
        assert h.incompatible_features & C.INCOMPAT_DIRTY

    def teardown(self):
        try:
            self.dev.close()
            verify_against_qemu(self.qemu, self.path, bytes(self.model), self.workdir, self.cfg.extended_l2)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def extended_l2_writable(tmp: str) -> bool:
    """Extended-L2 images may still be read-only in qcowpy (a clean UnsupportedFeature)."""
    from qcowpy.errors import UnsupportedFeature
    path = os.path.join(tmp, "probe.qcow2")
    qcowpy.create(path, MiB, extended_l2=True)
    try:
        with qcowpy.open(path, "r+") as dev:
            dev.pwrite(b"x", 0)
        return True
    except UnsupportedFeature:
        return False


def run_machine(qemu, cfg: Config, max_examples: int, steps: int) -> None:
    if cfg.extended_l2:
        with tempfile.TemporaryDirectory() as d:
            if not extended_l2_writable(d):
                pytest.skip("qcowpy does not write extended-L2 images yet (refuses with UnsupportedFeature)")
    machine = type(f"Machine_{cfg.id().replace('-', '_')}", (ImageMachine,), {"cfg": cfg, "qemu": qemu})
    run_state_machine_as_test(machine, settings=settings(
        max_examples=max_examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=list(HealthCheck), derandomize=False))


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.id() for c in CONFIGS])
def test_random_workload(qemu, cfg):
    run_machine(qemu, cfg, max_examples=30 if cfg.cluster_size < 2 * MiB else 8, steps=40)


@pytest.mark.torture
@pytest.mark.parametrize("cfg", TORTURE_CONFIGS, ids=[c.id() for c in TORTURE_CONFIGS])
def test_random_workload_torture(qemu, cfg):
    run_machine(qemu, cfg, max_examples=60 if cfg.cluster_size < 2 * MiB else 15, steps=60)
