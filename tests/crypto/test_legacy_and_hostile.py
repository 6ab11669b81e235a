"""Legacy AES images (qemu-img 7.2 still creates and reads them), the ``encrypt.format``
open option, and hostile encryption metadata: the messages and exit codes of qemu-img."""
from __future__ import annotations

import shutil
import struct

import pytest

import qcowpy
from tests.cli.helpers import qcowpy as cli
from tests.crypto.helpers import (ITER, qemu_check, qemu_create, qemu_io, qemu_raw, run, run_timed, secret_arg, spec,
                                  tools)

pytestmark = pytest.mark.interop


def test_legacy_aes_both_ways(tmp_path):
    qemu_img, _ = tools()
    img = tmp_path / "q.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", *secret_arg("legacy key"), "-o", "encryption=on,encrypt.key-secret=s0",
        img, "2M")
    qemu_io(img, "legacy key", "write -P 0x5a 512 70000", "write -P 0x33 1M 4096")
    want = qemu_raw(img, "legacy key", tmp_path / "q.raw")
    with qcowpy.open(str(img), secret="legacy key") as dev:
        assert dev.pread(dev.size, 0) == want
    for fmt in ("human", "json"):
        assert cli("info", f"--output={fmt}", img).out == run(qemu_img, "info", f"--output={fmt}", img).stdout
    # qcowpy creates (the same Formatting line) and writes; QEMU reads and checks
    ours = tmp_path / "o.qcow2"
    r = cli("create", "-f", "qcow2", *secret_arg("legacy key"), "-o", "encryption=on,encrypt.key-secret=s0", ours, "2M")
    q = run(qemu_img, "create", "-f", "qcow2", *secret_arg("legacy key"), "-o", "encryption=on,encrypt.key-secret=s0",
            tmp_path / "o2.qcow2", "2M")
    assert r.code == 0 and r.out == q.stdout.replace("o2.qcow2", "o.qcow2")
    assert ours.read_bytes() == (tmp_path / "o2.qcow2").read_bytes()  # nothing random in an AES image
    with qcowpy.open(str(ours), "r+", secret="legacy key") as dev:
        dev.pwrite(b"\x5a" * 70000, 512)
        dev.pwrite(b"\x33" * 4096, 1 << 20)
        dev.pwrite(b"\x44" * 10, 3)  # a partial sector: read-modify-write of whole sectors
    want = bytearray(want)
    want[3:13] = b"\x44" * 10
    assert qemu_check(ours, "legacy key").returncode == 0
    assert qemu_raw(ours, "legacy key", tmp_path / "o.raw") == bytes(want)
    # AES sectors are numbered by guest offset: the same data gives the same ciphertext
    r = cli("convert", "-O", "qcow2", *secret_arg("k"), "-o", "encrypt.format=aes,encrypt.key-secret=s0",
            tmp_path / "o.raw", tmp_path / "c.qcow2")
    assert r.code == 0, r.err
    assert qemu_raw(tmp_path / "c.qcow2", "k", tmp_path / "c.raw") == bytes(want)


def test_encrypt_format_open_option(tmp_path):
    qemu_img, _ = tools()
    plain = tmp_path / "p.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", plain, "1M")
    aes = tmp_path / "a.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", *secret_arg("x"), "-o", "encrypt.format=aes,encrypt.key-secret=s0",
        aes, "1M")
    for path, extra in ((plain, "encrypt.format=luks,encrypt.key-secret=s0"), (plain, "encrypt.format=aes"),
                        (aes, "encrypt.format=luks,encrypt.key-secret=s0"), (plain, "encrypt.key-secret=s0"),
                        (aes, "encrypt.format=aes,encrypt.key-secret=s0")):
        for cmd in (["check"], ["convert", "-O", "raw"]):
            tail = [tmp_path / "x.raw"] if cmd[0] == "convert" else []
            argv = [*cmd, *secret_arg("x"), "--image-opts", f"driver=qcow2,file.filename={path},{extra}", *tail]
            q = run(qemu_img, *argv, check=False)
            o = cli(*argv)
            assert (o.code, o.err.replace("qcowpy:", "qemu-img:")) == (q.returncode, q.stderr), argv


def _patched(tmp_path, name, patch):
    src = tmp_path / "good.qcow2"
    if not src.exists():
        qemu_create(src, "pw", f"encrypt.format=luks,encrypt.key-secret=s0,{ITER}", "1M")
    path = tmp_path / f"{name}.qcow2"
    shutil.copy(src, path)
    buf = bytearray(path.read_bytes())
    ext = struct.unpack_from(">I", buf, 100)[0]  # header_length: the first extension (FDE, as QEMU orders them)
    assert struct.unpack_from(">I", buf, ext)[0] == 0x0537BE77
    area = struct.unpack_from(">Q", buf, ext + 8)[0]
    patch(buf, ext, area)
    path.write_bytes(bytes(buf))
    return path


HOSTILE = {
    "fde_without_luks": lambda b, e, a: struct.pack_into(">I", b, 32, 0),
    "fde_bad_size": lambda b, e, a: struct.pack_into(">I", b, e + 4, 8),
    "fde_unaligned": lambda b, e, a: struct.pack_into(">Q", b, e + 8, a + 512),
    "fde_missing": lambda b, e, a: struct.pack_into(">I", b, e, 0x12345678),
    "area_too_short": lambda b, e, a: struct.pack_into(">Q", b, e + 16, 100),
    "area_past_eof": lambda b, e, a: struct.pack_into(">Q", b, e + 8, 1 << 40),
    "luks_magic": lambda b, e, a: b.__setitem__(slice(a, a + 6), b"NOTLUK"),
    "luks_version": lambda b, e, a: struct.pack_into(">H", b, a + 6, 9),
    "luks_mode": lambda b, e, a: b.__setitem__(slice(a + 40, a + 72), b"xts-plain99".ljust(32, b"\0")),
    "luks_stripes": lambda b, e, a: struct.pack_into(">I", b, a + 208 + 44, 12),
    "luks_slot_state": lambda b, e, a: struct.pack_into(">I", b, a + 208 + 48, 7),
    "luks_key_len": lambda b, e, a: struct.pack_into(">I", b, a + 108, 1 << 30),
    "luks_payload": lambda b, e, a: struct.pack_into(">I", b, a + 104, 3),
    "crypt_method_3": lambda b, e, a: struct.pack_into(">I", b, 32, 3),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_encryption_metadata(tmp_path, name):
    """info (no key) and check (with the key): qemu-img's exit code and message, and the
    file untouched."""
    qemu_img, _ = tools()
    path = _patched(tmp_path, name, HOSTILE[name])
    before = path.read_bytes()
    for argv in (["info", path], ["check", *secret_arg("pw"), "--image-opts", spec(path)],
                 ["convert", "-O", "raw", *secret_arg("pw"), "--image-opts", spec(path), tmp_path / "o.raw"]):
        q = run(qemu_img, *argv, check=False)
        o = cli(*argv)
        if q.returncode < 0:  # qemu-img 7.2 info crashes (SIGSEGV) on a LUKS image without the extension
            assert name == "fde_missing" and o.code == 1
            assert o.err == f"qcowpy: Could not open '{path}': Missing CRYPTO header for crypt method 2\n"
            continue
        assert o.code == q.returncode, (argv, o, q.stderr)
        if q.returncode:
            assert o.err.replace("qcowpy:", "qemu-img:") == q.stderr, argv
        elif argv[0] == "info":
            assert o.out == q.stdout
    assert path.read_bytes() == before


@pytest.mark.parametrize("opts", [
    "encrypt.format=luks,encrypt.key-secret=s0",
    "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,cluster_size=4k",
    "encrypt.format=aes,encrypt.key-secret=s0",
    "encrypt.format=luks",
    "encrypt.format=luks,encrypt.key-secret=nope",
    "encrypt.format=luks,encrypt.cipher-alg=foo",
])
def test_measure_counts_the_luks_header(opts):
    """qemu-img measure adds the LUKS header area (rounded to clusters) to both sizes."""
    qemu_img, _ = tools()
    argv = ["measure", *secret_arg("x"), "-O", "qcow2", "-o", opts, "--size", "100M"]
    q = run_timed(qemu_img, *argv)
    o = cli(*argv)
    assert (o.code, o.out, o.err.replace("qcowpy:", "qemu-img:")) == (q.returncode, q.stdout, q.stderr)


@pytest.mark.parametrize("alg", ["serpent-256", "twofish-128"])
def test_ciphers_without_a_library_implementation(tmp_path, alg):
    """qemu-img makes Serpent and Twofish images; qcowpy describes them exactly (info reads no
    data) and refuses to unlock them with a clear message instead of a hand-made cipher."""
    qemu_img, _ = tools()
    img = tmp_path / "s.qcow2"
    qemu_create(img, "pw", f"encrypt.format=luks,encrypt.key-secret=s0,{ITER},encrypt.cipher-alg={alg}", "1M")
    for fmt in ("human", "json"):
        assert cli("info", f"--output={fmt}", img).out == run(qemu_img, "info", f"--output={fmt}", img).stdout
    before = img.read_bytes()
    r = cli("check", *secret_arg("pw"), "--image-opts", spec(img))
    assert r.code == 1 and r.err == (f"qcowpy: Could not open '{spec(img)}': Cipher algorithm '{alg}' is not "
                                     "supported by qcowpy (the cryptography package has no implementation of it)\n")
    with pytest.raises(qcowpy.QcowError, match="not supported by qcowpy"):
        qcowpy.open(str(img), secret="pw")
    assert img.read_bytes() == before


def test_wrong_passphrase_leaves_a_dirty_image_unrepaired(tmp_path):
    """A read-write open repairs a dirty (lazy refcounts) image, but only after the key is
    found, as in QEMU: with a wrong passphrase nothing is written."""
    _, qemu_io_exe = tools()
    img = tmp_path / "d.qcow2"
    qemu_create(img, "pw", f"encrypt.format=luks,encrypt.key-secret=s0,{ITER},lazy_refcounts=on", "1M")
    run(qemu_io_exe, *secret_arg("pw"), "--image-opts", spec(img), "-c", "write -P 7 0 64k", "-c", "abort", check=False)
    assert struct.unpack_from(">Q", img.read_bytes(), 72)[0] & 1  # the dirty bit
    before = img.read_bytes()
    with pytest.raises(qcowpy.QcowError, match="Invalid password"):
        qcowpy.open(str(img), "r+", secret="wrong")
    assert img.read_bytes() == before
    with qcowpy.open(str(img), "r+", secret="pw") as dev:  # the right one repairs, then reads
        assert dev.pread(65536, 0) == b"\x07" * 65536
    assert qemu_check(img, "pw").returncode == 0


def test_secret_must_be_utf8_and_stops_at_nul(tmp_path):
    qemu_img, _ = tools()
    img = tmp_path / "u.qcow2"
    qemu_create(img, "ab", f"encrypt.format=luks,encrypt.key-secret=s0,{ITER}", "1M")
    (tmp_path / "bad").write_bytes(b"\xff\xfe")
    (tmp_path / "nul").write_bytes(b"ab\0cd")  # glib calls a NUL byte invalid UTF-8
    for name in ("bad", "nul"):
        argv = ["check", "--object", f"secret,id=s0,file={tmp_path / name}", "--image-opts", spec(img)]
        q = run(qemu_img, *argv, check=False)
        o = cli(*argv)
        assert (o.code, o.err.replace("qcowpy:", "qemu-img:")) == (q.returncode, q.stderr), name
