"""A QEMU guest on a ``qcowpy nbd`` export: SeaBIOS boots tests/nbd/guest/boot.bin from the export over
virtio-blk; the boot sector reads 64 sectors, writes them back inverted at LBA 1000, and reports."""
from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import run, tool

pytestmark = pytest.mark.interop

GUEST = Path(__file__).parent / "guest"


def test_guest_reads_and_writes_the_export(qemu, start_server, tmp_path):
    model = bytearray(64 << 20)
    model[:512] = (GUEST / "boot.bin").read_bytes()
    model[512:65 * 512] = random.Random(5).randbytes(64 * 512)
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    img = tmp_path / "guest.qcow2"
    qemu.img("convert", "-O", "qcow2", str(raw), str(img))
    srv = start_server("qcowpy", img, "-f", "qcow2")
    debug = tmp_path / "debugcon.log"
    p = run(tool("qemu-system-x86_64"), "-machine", "pc,accel=tcg", "-m", "32", "-display", "none", "-nodefaults",
            "-no-reboot", "-drive", f"file={srv.uri},format=raw,if=virtio", "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04", "-debugcon", f"file:{debug}", "-serial", "none",
            "-monitor", "none", check=False, timeout=120)
    assert (p.returncode, debug.read_bytes()) == (33, b"OK"), p.stderr
    assert srv.wait_exit() == 0  # its only client left: the server flushes and exits
    model[1000 * 512:1064 * 512] = bytes(b ^ 0xFF for b in model[512:65 * 512])
    qemu.assert_clean(img)
    assert qemu.to_raw(img, tmp_path / "after.raw") == bytes(model)


def test_boot_sector_is_built_from_its_source(tmp_path):
    """boot.bin is checked in (CI need not assemble); it must be what boot.S assembles to."""
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.skip("binutils (as, ld) not installed")
    obj, out = tmp_path / "boot.o", tmp_path / "boot.bin"
    subprocess.run(["as", "--32", "-o", str(obj), str(GUEST / "boot.S")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary", "-o", str(out), str(obj)],
                   check=True)
    assert out.read_bytes() == (GUEST / "boot.bin").read_bytes()
