"""Every command on rbd: images, with qemu-img/qemu-io and the rbd CLI as the oracle both ways."""
from __future__ import annotations

import json

import pytest

from qcowpy.block.rbdspec import parse_filename
from tests.rbd.conftest import qcowpy, qcowpy_proc, qemu_img, qemu_io, same_errors


def _pattern_image(ceph, image: str, size: str = "64M") -> str:
    """An rbd image made by qemu-img with data in objects 0, 2 and the last, holes elsewhere."""
    name = ceph.name(image)
    qemu_img("create", "-f", "raw", name, size)
    last = int(size[:-1]) - 4
    qemu_io(name, "write -P 0x11 0 64k", "write -P 0x22 8M 1M" if last > 8 else "write -P 0x22 1M 64k",
            f"write -P 0x33 {last}M 4M")
    return name


def test_names_parse_like_qemu(ceph, image):
    """QEMU's names for the same node (qemu-img info's filename) match ours for each spelling."""
    qemu_img("create", "-f", "raw", ceph.name(image), "1M")
    conf = ceph.conf
    for name in (f"rbd:rbd/{image}:conf={conf}", f"rbd:rbd/{image}:conf={conf}:id=admin",
                 f"rbd:rbd/{image}:id=admin:conf={conf}:rbd_cache=false:client_mount_timeout=20",
                 f"rbd:r\\bd/{image}:conf={conf}"):
        theirs = json.loads(qemu_img("info", "--output=json", name).stdout)
        ours = json.loads(qcowpy("info", "--output=json", name).stdout)
        assert ours == theirs
    loc = parse_filename("rbd:p\\:x/ns/img@snap:conf=/a\\:b:id=u:mon_host=1.2.3.4\\:6789:x=y")
    assert (loc.pool, loc.namespace, loc.image, loc.snapshot, loc.conf, loc.user, loc.keypairs) == \
        ("p:x", "ns", "img", "snap", "/a:b", "u", [("mon_host", "1.2.3.4:6789"), ("x", "y")])


def test_info_human_and_json_match_qemu(ceph, image):
    name = _pattern_image(ceph, image)
    conf = ceph.conf
    spellings = [[name], ["-f", "raw", name],
                 ["--image-opts", f"driver=rbd,pool=rbd,image={image},conf={conf}"],
                 ["--image-opts", f"driver=raw,file.driver=rbd,file.pool=rbd,file.image={image},file.conf={conf}"],
                 [f'json:{{"driver": "rbd", "pool": "rbd", "image": "{image}", "conf": "{conf}"}}'],
                 ["--image-opts", f"driver=rbd,pool=rbd,image={image},conf={conf},server.0.host=127.0.0.1,"
                                  f"server.0.port={ceph.port},user=admin"]]
    for args in spellings:
        for out in ("human", "json"):
            assert qcowpy("info", f"--output={out}", *args).stdout == \
                qemu_img("info", f"--output={out}", *args).stdout, args


def test_open_errors_match_qemu(ceph, image):
    conf = ceph.conf
    qemu_img("create", "-f", "raw", ceph.name(image), "1M")
    for name in (f"rbd:nopool/{image}:conf={conf}", f"rbd:rbd/missing-{image}:conf={conf}",
                 f"rbd:rbd/nons/{image}:conf={conf}", f"rbd:rbd/{image}@nosnap:conf={conf}",
                 f"rbd:rbd/{image}:conf={conf}:not_a_ceph_option=1", f"rbd:rbd/{image}:conf={conf}:novalue",
                 "rbd:rbd", f"rbd:rbd/{image}:conf=/nonexistent.conf"):
        same_errors(qcowpy_proc("info", name, check=False), qemu_img("info", name, check=False))


def test_cluster_down_fails_in_bounded_time(ceph, image):
    """Nothing listens on the monitor address: one line and exit 1 after client_mount_timeout."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"rbd:rbd/{image}:mon_host=127.0.0.1\\:{port}:auth_supported=none:client_mount_timeout=2"
    t = time.monotonic()
    ours = qcowpy_proc("info", name, check=False, timeout=60)
    assert time.monotonic() - t < 30
    same_errors(ours, qemu_img("info", name, check=False))
    assert ours.stderr.count("\n") == 1 and "error connecting: Connection timed out" in ours.stderr


def test_create_options_and_errors_match_qemu(ceph, image):
    ours = qcowpy("create", "-f", "raw", "-o", "cluster_size=64k", ceph.name(image), "10M")
    theirs = qemu_img("create", "-f", "raw", "-o", "cluster_size=64k", ceph.name(image + "q"), "10M")
    assert ours.stdout.replace(image, image + "q") == theirs.stdout
    for img in (image, image + "q"):
        info = json.loads(ceph.rbd("info", "--format=json", img).stdout)
        assert (info["order"], info["size"]) == (16, 10 << 20)
    for opts, name in (("cluster_size=64k", image), ("cluster_size=1000", image + "x"),
                       ("cluster_size=1k", image + "x"), ("preallocation=full", image + "x")):
        ours = qcowpy_proc("create", "-f", "raw", "-o", opts, ceph.name(name), "1M", check=False)
        theirs = qemu_img("create", "-f", "raw", "-o", opts, ceph.name(name), "1M", check=False)
        assert ours.stdout == theirs.stdout
        same_errors(ours, theirs)


def test_map_and_compare_match_qemu(ceph, image, tmp_path):
    name = _pattern_image(ceph, image)
    for out in ("human", "json"):
        assert qcowpy("map", f"--output={out}", name).stdout == qemu_img("map", f"--output={out}", name).stdout
    raw = tmp_path / "x.raw"
    qemu_img("convert", "-O", "raw", name, raw)
    assert qcowpy("compare", name, raw).stdout == "Images are identical.\n"
    qemu_io(name, "write -P 0x44 30M 512")
    ours, theirs = qcowpy_proc("compare", name, raw, check=False), qemu_img("compare", name, raw, check=False)
    assert (ours.returncode, ours.stdout) == (theirs.returncode, theirs.stdout) == (1, theirs.stdout)


@pytest.mark.parametrize("completions", ["notice", "ctypes"])
def test_convert_into_rbd_sparse_then_back(ceph, image, tmp_path, completions, monkeypatch):
    """qcow2 -> rbd: holes stay holes (the object map agrees with qemu-img's own convert), then rbd ->
    qcow2 by us and by qemu-img: same bytes, clean check. Both ways librbd reports completions:
    the compiled notices and the ctypes callbacks of a checkout without a build."""
    from qcowpy.block import librbd
    if completions == "ctypes":
        monkeypatch.setattr(librbd, "_notice", None)
    elif librbd._notice is None:
        pytest.skip("the compiled extension is not built")
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", src, "48M")
    qemu_io(str(src), "write -P 0x5a 0 1M", "write -P 0xa5 20M 64k", "write -z 30M 1M", fmt="qcow2")
    ours, theirs = ceph.name(image), ceph.name(image + "q")
    out = qcowpy("convert", "-p", "-O", "raw", src, ours)
    assert "100.00/100%" in out.stdout
    qemu_img("convert", "-O", "raw", src, theirs)
    assert qemu_img("compare", src, ours).returncode == 0
    assert qemu_img("map", "--output=json", ours).stdout == qemu_img("map", "--output=json", theirs).stdout \
        .replace(image + "q", image)
    objects = json.loads(ceph.rbd("diff", "--whole-object", "--format=json", image).stdout)
    assert [(o["offset"], o["length"]) for o in objects] == [(0, 4 << 20), (20 << 20, 4 << 20)]
    back = tmp_path / "back.qcow2"
    qcowpy("convert", "-O", "qcow2", ours, back)
    assert qemu_img("compare", back, src).returncode == 0
    assert qemu_img("check", back).returncode == 0


def test_convert_n_into_existing_and_measure(ceph, image, tmp_path):
    name = _pattern_image(ceph, image, "16M")
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(range(256)) * (16 << 12))
    qcowpy("convert", "-n", "-O", "raw", src, name)
    assert qemu_img("compare", "-f", "raw", "-F", "raw", src, name).returncode == 0
    for fmt in ("qcow2", "raw"):
        for out in ("human", "json"):
            assert qcowpy("measure", f"--output={out}", "-O", fmt, name).stdout == \
                qemu_img("measure", f"--output={out}", "-O", fmt, name).stdout


def test_resize_matches_qemu(ceph, image):
    name = ceph.name(image)
    qemu_img("create", "-f", "raw", name, "8M")
    assert qcowpy("resize", name, "+4M").stdout == "Image resized.\n"
    assert json.loads(ceph.rbd("info", "--format=json", image).stdout)["size"] == 12 << 20
    same_errors(qcowpy_proc("resize", name, "4M", check=False), qemu_img("resize", name, "4M", check=False))
    qcowpy("resize", "--shrink", name, "4M")
    assert json.loads(qemu_img("info", "--output=json", name).stdout)["virtual-size"] == 4 << 20


def test_snapshots_both_ways(ceph, image):
    name = _pattern_image(ceph, image, "8M")
    qcowpy("snapshot", "-c", "s1", name)
    assert [s["name"] for s in json.loads(ceph.rbd("snap", "ls", "--format=json", image).stdout)] == ["s1"]
    qemu_img("snapshot", "-c", "s2", name)
    assert qcowpy("snapshot", "-l", name).stdout == qemu_img("snapshot", "-l", name).stdout
    assert qcowpy("info", name).stdout == qemu_img("info", name).stdout
    qemu_io(name, "write -P 0x77 0 64k")
    qcowpy("snapshot", "-a", "s1", name)
    qemu_io(name, "read -P 0x11 0 64k")
    # a snapshot opens read-only: reading it works, writing it fails as in qemu-img
    assert qcowpy("compare", f"rbd:rbd/{image}@s1:conf={ceph.conf}", name).returncode == 0
    same_errors(qcowpy_proc("resize", f"rbd:rbd/{image}@s1:conf={ceph.conf}", "+1M", check=False),
                qemu_img("resize", f"rbd:rbd/{image}@s1:conf={ceph.conf}", "+1M", check=False))
    for args in (["-c", "s1"], ["-c", ""], ["-d", "nosuch"], ["-a", "nosuch"]):
        same_errors(qcowpy_proc("snapshot", *args, name, check=False), qemu_img("snapshot", *args, name, check=False))
    qcowpy("snapshot", "-d", "s1", name)
    qemu_img("snapshot", "-d", "s2", name)
    assert json.loads(ceph.rbd("snap", "ls", "--format=json", image).stdout) == []


def test_qcow2_on_rbd_both_ways(ceph, image, tmp_path):
    """qcow2 images stored on rbd: we create and write, QEMU checks and reads; QEMU writes, we read."""
    name = ceph.name(image)
    ours = qcowpy("create", "-f", "qcow2", name, "64M")
    theirs = qemu_img("create", "-f", "qcow2", ceph.name(image + "q"), "64M")
    assert ours.stdout.replace(image, image + "q") == theirs.stdout
    import qcowpy as api
    with api.open(name, "r+") as dev:
        assert dev.format == "qcow2"
        dev.pwrite(b"\x42" * 100000, 5 << 20)
        dev.write_zeroes(1 << 20, 8 << 20)
        dev.flush()
    assert qemu_img("check", name).returncode == 0
    qemu_io(name, "read -P 0x42 5M 100000", "read -P 0 8M 1M", fmt="qcow2")
    qemu_io(name, "write -P 0x66 40M 256k", fmt="qcow2")
    for out in ("human", "json"):
        assert qcowpy("info", f"--output={out}", name).stdout == qemu_img("info", f"--output={out}", name).stdout
        assert qcowpy("map", f"--output={out}", name).stdout == qemu_img("map", f"--output={out}", name).stdout
    local = tmp_path / "l.qcow2"
    qemu_img("convert", "-O", "qcow2", name, local)
    assert qcowpy("compare", name, local).returncode == 0
    qcowpy("convert", "-O", "qcow2", local, ceph.name(image + "c"))
    assert qemu_img("check", ceph.name(image + "c")).returncode == 0
    assert qemu_img("compare", ceph.name(image + "c"), local).returncode == 0


def test_api_block_device(ceph, image, tmp_path):
    """pread/pwrite/write_zeroes/discard/flush/block_status through qcowpy.open, against qemu-io."""
    import qcowpy as api
    name = ceph.name(image)
    qemu_img("create", "-f", "raw", name, "32M")
    with api.open(name, "r+") as dev:
        assert (dev.size, dev.format, dev.cluster_size) == (32 << 20, "raw", 4 << 20)
        dev.pwrite(b"\xcd" * (9 << 20), 1 << 20)
        dev.write_zeroes(4 << 20, 4 << 20, unmap=True)  # a whole object: unmapped
        dev.discard(1 << 20, 1 << 20)  # part of an object: reads as zeros
        dev.flush()
        assert dev.pread(8, 1 << 20) == bytes(8)
        ext = [(e.start, e.length, e.data, e.zero) for e in dev.block_status()]
    qemu_io(name, "read -P 0 1M 1M", "read -P 0xcd 2M 2M", "read -P 0 4M 4M", "read -P 0xcd 8M 2M",
            "read -P 0 10M 22M")
    theirs = [(e["start"], e["length"], e["data"], e["zero"]) for e in
              json.loads(qemu_img("map", "--output=json", name).stdout)]
    assert ext == theirs
    # a sequential reader is served from read-ahead: the same bytes as qemu-img reads, also when
    # the pattern breaks (a jump, a different length) and at the end of the image
    raw = tmp_path / "all.raw"
    qemu_img("convert", "-O", "raw", name, raw)
    want = raw.read_bytes()
    with api.open(name) as dev:
        got = [dev.pread(3 << 20, off) for off in range(0, 30 << 20, 3 << 20)]
        assert b"".join(got) == want[:30 << 20]
        assert dev.pread(1 << 20, 5 << 20) == want[5 << 20:6 << 20]
        assert dev.pread(2 << 20, 6 << 20) == want[6 << 20:8 << 20]
        assert dev.pread(2 << 20, 30 << 20) == want[30 << 20:]


def test_cephx_key_from_secret_object_and_keyring(ceph, image, tmp_path):
    """The cluster uses cephx: with a configuration that has no keyring, the key comes from
    --object secret (key-secret) or a keyring option in the name; a missing, wrong or unknown
    key fails as in qemu-img."""
    qemu_img("create", "-f", "raw", ceph.name(image), "1M")
    nokey = tmp_path / "nokey.conf"
    nokey.write_text("".join(line if not line.startswith("keyring") else "keyring = /dev/null\n"
                             for line in ceph.conf.read_text().splitlines(keepends=True)))
    opts = f"driver=rbd,pool=rbd,image={image},conf={nokey},user=admin"
    good = ["--object", f"secret,id=sec0,data={ceph.admin_key()},format=base64", "--image-opts",
            opts + ",key-secret=sec0"]
    for out in ("human", "json"):
        assert qcowpy("info", f"--output={out}", *good).stdout == qemu_img("info", f"--output={out}", *good).stdout
    name = f"rbd:rbd/{image}:conf={nokey}:id=admin:keyring={ceph.root}/client.admin.keyring"
    assert qcowpy("info", name).stdout == qemu_img("info", name).stdout
    for args in (["--image-opts", opts],
                 ["--object", "secret,id=sec0,data=QUFBQQ==,format=base64", "--image-opts", opts + ",key-secret=sec0"],
                 ["--image-opts", opts + ",key-secret=nosuch"]):
        same_errors(qcowpy_proc("info", *args, check=False), qemu_img("info", *args, check=False))


def test_local_overlay_on_rbd_backing_and_commit(ceph, image, tmp_path):
    """A local qcow2 overlay whose backing file is an rbd image (a cloud's golden image): the chain
    reads and maps as in qemu-img, and commit writes the overlay's data into the rbd image."""
    base = _pattern_image(ceph, image, "16M")
    ov = tmp_path / "ov.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", ov)
    qemu_io(str(ov), "write -P 0x3c 1M 64k", fmt="qcow2")
    for out in ("human", "json"):
        assert qcowpy("info", "--backing-chain", f"--output={out}", ov).stdout == \
            qemu_img("info", "--backing-chain", f"--output={out}", ov).stdout
        assert qcowpy("map", f"--output={out}", ov).stdout == qemu_img("map", f"--output={out}", ov).stdout
    assert qcowpy("commit", ov).stdout == "Image committed.\n"
    qemu_io(base, "read -P 0x3c 1M 64k", "read -P 0x11 0 64k")
