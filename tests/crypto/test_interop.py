"""Encrypted qcow2 against qemu-img/qemu-io, both ways, on the same passphrases.

QEMU writes -> qcowpy reads identical bytes; qcowpy creates and writes -> qemu-io reads the
same bytes, ``qemu-img check`` is clean, ``qemu-img compare`` says identical. Every cipher,
mode, IV generator and hash qemu-img 7.2 accepts that the cryptography package implements
(all but Serpent and Twofish) appears at least once.
"""
from __future__ import annotations

import os
import random

import pytest

import qcowpy
from tests.cli.helpers import qcowpy as cli
from tests.crypto.helpers import (ITER, json_name, qemu_check, qemu_create, qemu_io, qemu_raw, run, run_timed, secret_arg,
                                  spec, tools)

pytestmark = pytest.mark.interop

MiB = 1 << 20
COMBOS = [
    "",  # QEMU's defaults: aes-256, xts, plain64, sha256
    "encrypt.cipher-alg=aes-128",
    "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv",
    "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=md5",
    "encrypt.cipher-mode=cbc,encrypt.ivgen-alg=plain,encrypt.hash-alg=sha1",
    "encrypt.cipher-mode=ecb,encrypt.hash-alg=sha512",
    "encrypt.cipher-mode=ctr,encrypt.hash-alg=md5",
    "encrypt.cipher-alg=cast5-128,encrypt.cipher-mode=cbc,encrypt.hash-alg=ripemd160",
    "encrypt.ivgen-alg=plain64,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha224",
    "encrypt.hash-alg=sha384,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256",
]


def _luks_opts(extra: str) -> str:
    return ",".join(x for x in ("encrypt.format=luks,encrypt.key-secret=s0", ITER, extra) if x)


@pytest.mark.parametrize("extra", COMBOS)
def test_qemu_writes_qcowpy_reads(tmp_path, extra):
    img = tmp_path / "q.qcow2"
    qemu_create(img, "sekrit", _luks_opts(extra), "3M")
    qemu_io(img, "sekrit", "write -P 0x5a 0 64k", "write -P 0xa5 100k 3000", "write -P 0x11 1M 1M",
            "write -z 1536k 64k", "write -P 0x22 3071k 1k")
    want = qemu_raw(img, "sekrit", tmp_path / "q.raw")
    with qcowpy.open(str(img), secret="sekrit") as dev:
        assert dev.pread(dev.size, 0) == want
        assert dev.pread(1001, 100 * 1024 - 7) == want[100 * 1024 - 7:100 * 1024 + 994]  # unaligned
    # the CLI opens it with --image-opts and json:, and converts it out
    out = tmp_path / "ours.raw"
    r = cli("convert", "-O", "raw", *secret_arg("sekrit"), "--image-opts", spec(img), out)
    assert r.code == 0, r.err
    assert out.read_bytes() == want
    r = cli("compare", *secret_arg("sekrit"), json_name(img), str(tmp_path / "q.raw"))
    assert (r.code, r.out) == (0, "Images are identical.\n"), r.err


def _model_writes(dev, model: bytearray, seed: int, n: int = 40) -> None:
    rnd = random.Random(seed)
    for _ in range(n):
        off = rnd.randrange(0, len(model) - 1)
        length = min(rnd.choice([1, 17, 511, 512, 4096, 65536, 100000]), len(model) - off)
        if rnd.random() < 0.15:
            dev.write_zeroes(length, off)
            model[off:off + length] = bytes(length)
        else:
            data = rnd.randbytes(length)
            dev.pwrite(data, off)
            model[off:off + length] = data


@pytest.mark.parametrize("extra", COMBOS)
def test_qcowpy_creates_and_writes_qemu_reads(tmp_path, extra):
    img = tmp_path / "o.qcow2"
    r = cli("create", "-q", "-f", "qcow2", *secret_arg("pass phrase"), "-o", _luks_opts(extra), img, "3M")
    assert r.code == 0, r.err
    model = bytearray(3 * MiB)
    with qcowpy.open(str(img), "r+", secret="pass phrase") as dev:
        _model_writes(dev, model, seed=len(extra))
    assert qemu_check(img, "pass phrase").returncode == 0
    assert qemu_raw(img, "pass phrase", tmp_path / "o.raw") == bytes(model)
    # QEMU writes into our image too, and qcowpy reads that back
    qemu_io(img, "pass phrase", "write -P 0x77 5000 70000")
    model[5000:75000] = b"\x77" * 70000
    with qcowpy.open(str(img), secret="pass phrase") as dev:
        assert dev.pread(dev.size, 0) == bytes(model)
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(model))
    qemu_img, _ = tools()
    p = run(qemu_img, "compare", *secret_arg("pass phrase"), json_name(img), raw, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_info_matches_qemu_human_and_json(tmp_path):
    qemu_img, _ = tools()
    img = tmp_path / "i.qcow2"
    qemu_create(img, "x", _luks_opts("encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv"), "1M")
    ours = tmp_path / "ours.qcow2"
    assert cli("create", "-q", "-f", "qcow2", *secret_arg("x"), "-o", _luks_opts(""), ours, "1M").code == 0
    for path in (img, ours):
        for fmt in ("human", "json"):
            q = run(qemu_img, "info", f"--output={fmt}", path)
            o = cli("info", f"--output={fmt}", path)
            assert o.code == 0 and o.out == q.stdout, (o.out, q.stdout)


def test_convert_into_and_out_of_encrypted_images(tmp_path):
    qemu_img, _ = tools()
    src = tmp_path / "src.raw"
    data = bytearray(os.urandom(2 * MiB))
    data[MiB:MiB + 300000] = bytes(300000)
    src.write_bytes(bytes(data))
    enc = tmp_path / "enc.qcow2"
    r = cli("convert", "-O", "qcow2", *secret_arg("k"), "-o", _luks_opts("encrypt.cipher-alg=aes-128"), src, enc)
    assert r.code == 0, r.err
    assert qemu_check(enc, "k").returncode == 0
    assert qemu_raw(enc, "k", tmp_path / "q.raw") == bytes(data)
    # out of it, into an unencrypted qcow2 and into another encrypted one (two secrets)
    plain = tmp_path / "plain.qcow2"
    assert cli("convert", "-O", "qcow2", *secret_arg("k"), "--image-opts", spec(enc), plain).code == 0
    assert run(qemu_img, "compare", src, plain, check=False).returncode == 0
    enc2 = tmp_path / "enc2.qcow2"
    r = cli("convert", *secret_arg("k"), *secret_arg("k2", "s1"), "-O", "qcow2",
            "-o", f"encrypt.format=luks,encrypt.key-secret=s1,{ITER}", json_name(enc), enc2)
    assert r.code == 0, r.err
    assert qemu_raw(enc2, "k2", tmp_path / "q2.raw") == bytes(data)


def test_other_commands_on_encrypted_images(tmp_path):
    qemu_img, _ = tools()
    img = tmp_path / "c.qcow2"
    qemu_create(img, "pw", _luks_opts(""), "2M")
    qemu_io(img, "pw", "write -P 0x61 0 1M")
    sec = secret_arg("pw")
    r = cli("check", *sec, "--image-opts", spec(img))
    assert r.code == 0 and "No errors were found on the image." in r.out, r.err
    r = cli("map", "--output=json", *sec, "--image-opts", spec(img))
    q = run(qemu_img, "map", "--output=json", *sec, "--image-opts", spec(img))
    assert r.code == 0 and r.out == q.stdout  # no host offsets for encrypted data, as QEMU
    r = cli("map", *sec, "--image-opts", spec(img))
    assert (r.code, r.err) == (1, "qcowpy: File contains external, encrypted or compressed clusters.\n")
    r = cli("snapshot", *sec, "-c", "snap1", "--image-opts", spec(img))
    assert r.code == 0, r.err
    r = cli("resize", *sec, "--image-opts", spec(img), "3M")
    assert r.code == 0, r.err
    qemu_io(img, "pw", "read -P 0x61 0 1M", "read -P 0 1M 2M")
    r = cli("dd", *sec, "-O", "raw", f"if={json_name(img)}", f"of={tmp_path / 'dd.raw'}", "bs=64k", "count=4")
    assert r.code == 0, r.err
    assert (tmp_path / "dd.raw").read_bytes() == b"\x61" * 256 * 1024
    assert qemu_check(img, "pw").returncode == 0
    # the snapshot still reads its data (copy-on-write re-encrypts at the new host offset)
    with qcowpy.open(str(img), "r+", secret="pw") as dev:
        dev.pwrite(b"\x62" * 4096, 8192)
    qemu_io(img, "pw", "read -P 0x61 0 8k", "read -P 0x62 8k 4k", "read -P 0x61 12k 1012k")
    assert qemu_check(img, "pw").returncode == 0
    r = cli("snapshot", *sec, "-a", "snap1", "--image-opts", spec(img))
    assert r.code == 0, r.err
    qemu_io(img, "pw", "read -P 0x61 0 1M")


def test_wrong_or_missing_passphrase(tmp_path):
    qemu_img, _ = tools()
    img = tmp_path / "w.qcow2"
    qemu_create(img, "right", _luks_opts(""), "1M")
    qemu_io(img, "right", "write -P 1 0 64k")
    before = img.read_bytes()
    for argv in (["check"], ["convert", "-O", "raw"], ["map"], ["snapshot", "-c", "s"], ["resize"]):
        tail = [tmp_path / "x.raw"] if argv[0] == "convert" else (["2M"] if argv[0] == "resize" else [])
        q = run(qemu_img, *argv, *secret_arg("wrong"), "--image-opts", spec(img), *tail, check=False)
        o = cli(*argv, *secret_arg("wrong"), "--image-opts", spec(img), *tail)
        assert q.returncode == 1 and o.code == 1
        assert o.err.replace("qcowpy:", "qemu-img:") == q.stderr
        assert q.stderr.endswith("Invalid password, cannot unlock any keyslot\n")
        q = run(qemu_img, *argv, img, *tail, check=False)
        o = cli(*argv, img, *tail)
        assert (o.code, o.err.replace("qcowpy:", "qemu-img:")) == (q.returncode, q.stderr)
        assert "Parameter 'encrypt.key-secret' is required for cipher" in o.err
    # a secret id nobody defined
    o = cli("check", *secret_arg("right"), "--image-opts", spec(img, "nope"))
    q = run(qemu_img, "check", *secret_arg("right"), "--image-opts", spec(img, "nope"), check=False)
    assert (o.code, o.err.replace("qcowpy:", "qemu-img:")) == (q.returncode, q.stderr)
    # info needs no key (it reads no data), with a wrong one too
    assert cli("info", img).code == 0
    assert cli("info", *secret_arg("wrong"), "--image-opts", spec(img)).code == 0
    assert img.read_bytes() == before
    with pytest.raises(qcowpy.QcowError, match="Invalid password, cannot unlock any keyslot"):
        qcowpy.open(str(img), "r+", secret="wrong")
    assert img.read_bytes() == before


def test_secret_object_forms(tmp_path):
    img = tmp_path / "s.qcow2"
    qemu_create(img, "abc", _luks_opts(""), "1M")
    qemu_io(img, "abc", "write -P 9 0 4k")
    (tmp_path / "pw").write_bytes(b"abc")
    for obj in ("secret,id=s0,file=" + str(tmp_path / "pw"), "secret,id=s0,data=YWJj,format=base64",
                '{"qom-type": "secret", "id": "s0", "data": "abc"}'):
        r = cli("dd", "--object", obj, "-O", "raw", f"if={json_name(img)}", f"of={tmp_path / 'o.raw'}", "bs=4k", "count=1")
        assert r.code == 0, (obj, r.err)
        assert (tmp_path / "o.raw").read_bytes() == b"\x09" * 4096
    qemu_img, _ = tools()
    for obj in ("secret,id=s0", "secret,id=s0,data=a,file=/etc/hostname", "secret,id=s0,data=@@,format=base64",
                "secret,id=s0,data=abc,format=hex", "secret,id=s0,file=/nonexistent/pw"):
        q = run(qemu_img, "info", "--object", obj, img, check=False)
        o = cli("info", "--object", obj, img)
        assert (o.code, o.err.replace("qcowpy:", "qemu-img:")) == (q.returncode, q.stderr), obj


def test_create_option_errors_match_qemu(tmp_path):
    qemu_img, _ = tools()
    cases = [
        "encryption=on,encrypt.format=luks,encrypt.key-secret=s0",
        "encrypt.format=luks",
        "encrypt.format=luks,encrypt.key-secret=zz",
        "encrypt.format=foo,encrypt.key-secret=s0",
        "encrypt.key-secret=s0,encrypt.iter-time=5",
        "encrypt.format=aes,encrypt.key-secret=s0,encrypt.cipher-alg=aes-128",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=sm4",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=des",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.hash-alg=sm3",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.cipher-alg=cast5-128",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha1",
        "encryption=yes,encrypt.key-secret=s0",
        "encryption=1",
        "encryption",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.foo=1",
    ]
    for opts in cases:
        q = run_timed(qemu_img, "create", "-f", "qcow2", *secret_arg("p"), "-o", opts, tmp_path / "q.qcow2", "1M")
        o = cli("create", "-f", "qcow2", *secret_arg("p"), "-o", opts, tmp_path / "o.qcow2", "1M")
        assert o.code == q.returncode == 1, opts
        assert o.out == q.stdout.replace("q.qcow2", "o.qcow2"), opts
        assert o.err.replace("qcowpy:", "qemu-img:").replace("o.qcow2", "q.qcow2") == q.stderr, opts


def test_formatting_line_matches_qemu(tmp_path):
    opts = _luks_opts("encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
                      "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1")
    o = cli("create", "-f", "qcow2", *secret_arg("p"), "-o", opts + ",compat=0.10", tmp_path / "o.qcow2", "1M")
    assert o.code == 0, o.err
    assert o.out == ("Formatting '" + str(tmp_path / "o.qcow2") + "', fmt=qcow2 encrypt.format=luks "
                     "encrypt.key-secret=s0 encrypt.cipher-alg=aes-128 encrypt.cipher-mode=cbc encrypt.ivgen-alg=essiv "
                     "encrypt.ivgen-hash-alg=sha256 encrypt.hash-alg=sha1 encrypt.iter-time=10 cluster_size=65536 "
                     "extended_l2=off compression_type=zlib size=1048576 compat=0.10 lazy_refcounts=off "
                     "refcount_bits=16\n")
    assert qemu_check(tmp_path / "o.qcow2", "p").returncode == 0


@pytest.mark.parametrize("extended", [False, True])
def test_extended_l2_and_backing_file(tmp_path, extended):
    """Subcluster writes and copy-on-write from an (unencrypted) backing file."""
    qemu_img, _ = tools()
    base = tmp_path / "base.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", base, "2M")
    run(tools()[1], "-c", "write -P 0x42 0 2M", base)
    top = tmp_path / "top.qcow2"
    opts = _luks_opts("extended_l2=on" if extended else "") + f",backing_file={base},backing_fmt=qcow2"
    r = cli("create", "-q", "-f", "qcow2", *secret_arg("t"), "-o", opts, top)
    assert r.code == 0, r.err
    with qcowpy.open(str(top), "r+", secret="t") as dev:
        dev.pwrite(b"\x01" * 1000, 70000)
        dev.pwrite(b"\x02" * 5000, 300000)
    qemu_io(top, "t", "read -P 0x42 0 70000", "read -P 1 70000 1000", "read -P 0x42 71000 229000",
            "read -P 2 300000 5000", "read -P 0x42 305000 1792152")
    assert qemu_check(top, "t").returncode == 0


def test_compressed_clusters_in_encrypted_images(tmp_path):
    """QEMU stores compressed clusters of an encrypted image unencrypted; so does qcowpy, and
    each reads the other's. ``convert -c`` with encryption is refused as qemu-img refuses it."""
    qemu_img, _ = tools()
    img = tmp_path / "z.qcow2"
    qemu_create(img, "pw", _luks_opts(""), "1M")
    qemu_io(img, "pw", "write -c -P 0x66 128k 64k")
    with qcowpy.open(str(img), "r+", secret="pw") as dev:
        assert dev.pread(65536, 131072) == b"\x66" * 65536
        dev.write_compressed(b"\x67" * 65536, 262144)
    qemu_io(img, "pw", "read -P 0x66 128k 64k", "read -P 0x67 256k 64k")
    assert qemu_check(img, "pw").returncode == 0
    src = tmp_path / "s.raw"
    src.write_bytes(bytes(1 << 20))
    argv = ["convert", "-c", "-O", "qcow2", *secret_arg("pw"), "-o", _luks_opts(""), src, tmp_path / "c.qcow2"]
    q = run(qemu_img, *argv, check=False)
    o = cli(*argv)
    assert (o.code, o.err.replace("qcowpy:", "qemu-img:")) == (q.returncode, q.stderr)


def test_nbd_serves_an_encrypted_image(tmp_path):
    """``qcowpy nbd --object secret,... json:{..., "encrypt.key-secret": ...}`` serves the
    decrypted image; qemu-io reads it over NBD."""
    import subprocess
    import sys
    import time
    _, qemu_io_exe = tools()
    img = tmp_path / "n.qcow2"
    qemu_create(img, "pw", _luks_opts(""), "1M")
    qemu_io(img, "pw", "write -P 0x5c 4k 60k")
    sock = tmp_path / "n.sock"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(qcowpy.__file__)))
    server = subprocess.Popen([sys.executable, "-m", "qcowpy", "nbd", *secret_arg("pw"), "-k", str(sock), "-f", "qcow2",
                               json_name(img)], env=env, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        p = run(qemu_io_exe, "-r", "-f", "raw", "-c", "read -P 0 0 4k", "-c", "read -P 0x5c 4k 60k",
                f"nbd+unix:///?socket={sock}")
        assert "Pattern verification failed" not in p.stdout
    finally:
        server.kill()
        server.wait(10)


def test_storage_daemon_opens_an_encrypted_image(tmp_path):
    """``qcowpy storage-daemon --object secret,... --blockdev driver=qcow2,...,encrypt.key-secret=ID``
    (qemu-storage-daemon's syntax) opens the image decrypted; query-block says encrypted."""
    import threading

    from qcowpy.cli.storage_daemon import _setup
    from qcowpy.crypto.secret import SECRETS
    from qcowpy.export.daemon import Daemon
    img = tmp_path / "d.qcow2"
    qemu_create(img, "pw", _luks_opts(""), "1M")
    qemu_io(img, "pw", "write -P 0x3c 0 64k")
    daemon = Daemon()
    try:
        _setup(daemon, [("--object", "secret,id=sec0,data=pw"),
                        ("--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={img},"
                                       "encrypt.key-secret=sec0")], threading.Event())
        node = daemon.nodes["disk"]
        assert node.dev.pread(65536, 0) == b"\x3c" * 65536
        assert node.info()["encrypted"] is True
    finally:
        daemon.shutdown()
        SECRETS.clear()


def test_commit_and_rebase_keep_the_luks_header(tmp_path):
    """commit empties the overlay cluster by cluster when it is LUKS-encrypted (QEMU's
    qcow2_make_empty keeps the header area); rebase re-encrypts what it copies."""
    qemu_img, _ = tools()
    base = tmp_path / "b.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", base, "1M")
    top = tmp_path / "t.qcow2"
    r = cli("create", "-q", "-f", "qcow2", *secret_arg("pw"), "-o",
            _luks_opts("") + f",backing_file={base},backing_fmt=qcow2", top)
    assert r.code == 0, r.err
    qemu_io(top, "pw", "write -P 0x21 0 100k")
    r = cli("commit", *secret_arg("pw"), "--image-opts", spec(top))
    assert r.code == 0, r.err
    run(tools()[1], "-c", "read -P 0x21 0 100k", base)
    assert qemu_check(top, "pw").returncode == 0
    qemu_io(top, "pw", "read -P 0x21 0 100k", "write -P 0x22 200k 10k")
    base2 = tmp_path / "b2.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", base2, "1M")
    r = cli("rebase", *secret_arg("pw"), "-b", base2, "-F", "qcow2", "--image-opts", spec(top))
    assert r.code == 0, r.err
    qemu_io(top, "pw", "read -P 0x21 0 100k", "read -P 0 100k 100k", "read -P 0x22 200k 10k")
    assert qemu_check(top, "pw").returncode == 0
