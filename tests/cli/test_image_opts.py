"""``json:`` filenames, ``--image-opts`` and ``--object``: qemu-img's output and exit codes side by side."""
from __future__ import annotations

import filecmp

import pytest

from .helpers import as_qemu, qcowpy as run, qemu, qemu_io

NULL = 'json:{"driver": "null-co", "size": 1048576, "read-zeroes": true}'
WINDOW = 'json:{"driver": "raw", "offset": 65536, "size": 131072, "file": {"driver": "file", "filename": "d.raw"}}'

SAME_OUTPUT = [
    ["info", "--image-opts", "driver=qcow2,file.filename=s.qcow2"],
    ["info", "--image-opts", "file.filename=s.qcow2"],
    ["info", "--image-opts", "driver=qcow2,file.driver=file,file.filename=s.qcow2"],
    ["info", "--output=json", "json:{\"driver\": \"qcow2\", \"file\": {\"driver\": \"file\", \"filename\": \"s.qcow2\"}}"],
    ["info", "-U", "--force-share", "json:{\"file.filename\": \"s.qcow2\"}"],
    ["info", "--image-opts", "-f", "qcow2", "driver=qcow2,file.filename=s.qcow2"],
    ["info", "--image-opts", "driver=qcow2,file.filename=nope.qcow2"],
    ["info", 'json:{"driver": "foo"}'],
    ["info", 'json:{"driver": "qcow2"}'],
    ["info", "json:" + WINDOW[5:].replace("131072", "1048576000")],
    ["map", "--output=json", NULL],
    ["map", "--output=json", WINDOW],
    ["check", "--image-opts", "driver=qcow2,file.filename=s.qcow2"],
    ["compare", "--image-opts", "driver=qcow2,file.filename=s.qcow2", "driver=qcow2,file.filename=s.qcow2"],
    ["compare", "--image-opts", "driver=raw,offset=65536,size=131072,file.filename=d.raw",
     "driver=raw,offset=65536,size=131072,file.filename=d.raw"],
    ["compare", "-f", "raw", "d.raw", NULL],
    ["convert", "--target-image-opts", "s.qcow2", "driver=raw,file.filename=o.raw"],
    ["snapshot", "-l", "--image-opts", "driver=qcow2,file.filename=s.qcow2"],
    ["info", "--object", "secret,id=sec0,data=123456", "s.qcow2"],
    ["info", "--object", "secret,data=x", "s.qcow2"],
    ["info", "--object", "foo,id=a", "s.qcow2"],
    ["info", "--object", "secret,id=a,data=x", "--object", "secret,id=a,data=y", "s.qcow2"],
    ["check", "--object", "throttle-group,id=t0,x-bps-total=1000000", "s.qcow2"],
    ["convert", "-r", "1M", "-U", "-O", "raw", "s.qcow2", "r1.raw"],
    ["convert", "-r", "-5", "-O", "raw", "s.qcow2", "r1.raw"],
    ["convert", "--force-share", "-T", "none", "-t", "none", "-W", "-m", "4", "-O", "raw", "s.qcow2", "r1.raw"],
    ["info", "--force-share", "--output=json", "s.qcow2"],
]


@pytest.fixture
def images(tmp_path, qemu_img):
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", "s.qcow2", "1M", cwd=tmp_path).code == 0
    qemu_io(qemu_img, tmp_path / "s.qcow2", "write -P 7 0 64k")
    (tmp_path / "d.raw").write_bytes(bytes(range(256)) * 1024)
    return tmp_path


@pytest.mark.parametrize("args", SAME_OUTPUT, ids=lambda a: " ".join(a)[:60])
def test_same_output_and_exit_code(images, qemu_img, args):
    want = qemu(qemu_img, *args, cwd=images)
    got = run(*args, cwd=images)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)


@pytest.mark.parametrize("src", [WINDOW, NULL, "json:{\"driver\": \"qcow2\", \"file.filename\": \"s.qcow2\"}"],
                         ids=["raw-window", "null-co", "qcow2-dotted"])
def test_convert_from_a_json_source_gives_qemu_img_bytes(images, qemu_img, src):
    want = qemu(qemu_img, "convert", "-O", "raw", src, "a.raw", cwd=images)
    got = run("convert", "-O", "raw", src, "b.raw", cwd=images)
    assert (got.code, got.err) == (want.code, want.err) == (0, "")
    assert filecmp.cmp(images / "a.raw", images / "b.raw", shallow=False)


def test_write_through_a_raw_window_lands_at_the_offset(images, qemu_img):
    """convert -n into a raw window writes inside the window only (qemu-img does the same)."""
    import shutil
    shutil.copy(images / "d.raw", images / "e.raw")
    target = "driver=raw,offset=65536,size=131072,file.filename={}"
    args = ["convert", "-n", "-f", "raw", "--target-image-opts"]
    (images / "z.raw").write_bytes(b"\xa5" * 131072)
    want = qemu(qemu_img, *args, "z.raw", target.format("d.raw"), cwd=images)
    got = run(*args, "z.raw", target.format("e.raw"), cwd=images)
    assert (got.code, got.err) == (want.code, want.err) == (0, "")
    assert (images / "d.raw").read_bytes() == (images / "e.raw").read_bytes()


def test_bad_json_fails_like_qemu_img_up_to_the_parser_detail(images, qemu_img):
    """QEMU's JSON lexer words its complaints its own way; the rest of the line and the exit code match."""
    want = qemu(qemu_img, "info", "json:{bad", cwd=images)
    got = run("info", "json:{bad", cwd=images)
    head = "qemu-img: Could not open 'json:{bad': Could not parse the JSON options: JSON parse error, "
    assert got.code == want.code == 1
    assert want.err.startswith(head) and as_qemu(got.err).startswith(head) and got.err.count("\n") == 1


def test_file_prefix_names_paths_with_colons_as_qemu_img(tmp_path, qemu_img):
    """``file:`` takes the rest as the path, colons included; a relative one shows as ``./...``
    and its backing file resolves next to it (iotest 126)."""
    results = []
    for tool, d in (("qemu", tmp_path / "q"), ("ours", tmp_path / "o")):
        d.mkdir()
        call = (lambda *a: qemu(qemu_img, *a, cwd=d)) if tool == "qemu" else (lambda *a: run(*a, cwd=d))
        seq = [call("create", "-f", "qcow2", "file:a:b.qcow2", "64M"),
               call("create", "-q", "-f", "qcow2", "base.qcow2", "64M"),
               call("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "file:image:top.qcow2"),
               call("info", "file:image:top.qcow2"), call("info", "file:nope:x"),
               call("check", "file:image:top.qcow2"), call("map", "--output=json", "file:a:b.qcow2")]
        results.append([(r.code, r.out, as_qemu(r.err)) for r in seq]
                       + [sorted(p.name for p in d.iterdir())])
    assert results[0] == results[1]


@pytest.mark.parametrize("spec", [
    "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 's.qcow2'}}",
    "json:{'driver': 'qcow2', 'file': {'driver': 'blkdebug', 'image': {'driver': 'file', 'filename': 's.qcow2'}}}",
    "json:{'driver': 'raw', 'size': 65536, 'file.filename': 'd.raw'}",
], ids=["single-quotes", "blkdebug-child", "dotted"])
def test_qemu_json_extensions(images, qemu_img, spec):
    """QEMU's JSON parser takes single-quoted strings; a child with a debugging driver is refused
    by name (qemu-img knows blkdebug; its message is compared up to the driver's own text)."""
    want = qemu(qemu_img, "info", spec, cwd=images)
    got = run("info", spec, cwd=images)
    if "blkdebug" in spec:
        assert want.code == 0 and got.code == 1
        assert as_qemu(got.err) == f"qemu-img: Could not open '{spec}': Unknown driver 'blkdebug'\n"
        return
    assert (got.code, got.err) == (want.code, want.err) == (0, "")
    assert got.out.split("\n")[1:] == want.out.split("\n")[1:]  # QEMU prints its own JSON spelling first


def test_file_locking_off_lets_a_write_through_a_held_lock(images, qemu_img):
    """``file.locking=off`` (iotest 102): the command takes no locks, as qemu-img then does;
    the override ends with the command."""
    import fcntl
    import os
    from qcowpy import lock
    fd = os.open(images / "s.qcow2", os.O_RDWR)
    try:  # hold QEMU's write permission lock byte, as a running QEMU would
        fcntl.fcntl(fd, 37, __import__("struct").pack("hhqqi", fcntl.F_WRLCK, 0, 100 + 1, 1, 0))
        spec = "driver=qcow2,file.filename=s.qcow2,file.locking=off"
        assert run("resize", "--image-opts", spec, "2M", cwd=images).code == 0
        assert lock.enabled()
        assert run("resize", "s.qcow2", "3M", cwd=images).code == 1
    finally:
        os.close(fd)


@pytest.mark.parametrize("backing", ["file:{d}/s.qcow2", 'json:{{"driver": "qcow2", "file": {{"driver": "file", "filename": "{d}/s.qcow2"}}}}'],
                         ids=["file-prefix", "json"])
def test_create_with_a_file_or_json_backing_name(images, qemu_img, backing):
    """iotests 228 and backing-file-invalidation: the name is stored as given and opened as QEMU opens it."""
    name = backing.format(d=images)
    args = ["create", "-f", "qcow2", "-b", name, "-F", "qcow2"]
    want = qemu(qemu_img, *args, "a.qcow2", cwd=images)
    got = run(*args, "b.qcow2", cwd=images)
    assert (got.code, got.out.replace("b.qcow2", "a.qcow2"), got.err) == (want.code, want.out, want.err)
    for extra in ([], ["--backing-chain"]):
        want = qemu(qemu_img, "info", *extra, "a.qcow2", cwd=images)
        got = run("info", *extra, "b.qcow2", cwd=images)
        assert (got.code, got.out.replace("b.qcow2", "a.qcow2"), got.err) == (want.code, want.out, want.err)


@pytest.mark.parametrize("args", [
    ["info", "null-co://"], ["map", "--output=json", "null-co://"],
    ["map", "--output=json", 'json:{"driver": "null-co", "size": 1048576}'],  # no read-zeroes: not "zero"
    ["map", "--output=json", NULL],
], ids=["info-filename", "map-filename", "map-no-read-zeroes", "map-read-zeroes"])
def test_null_co_by_filename_and_status(qemu_img, args):
    """``null-co://`` opens as raw over QEMU's null protocol (1 GiB); its block status says
    "zero" only with read-zeroes, as QEMU's null driver does (iotest 155 backs images with it)."""
    want, got = qemu(qemu_img, *args), run(*args)
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)


def test_create_over_null_co_backing(tmp_path, qemu_img):
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    want = qemu(qemu_img, "create", "-f", "qcow2", "-b", "null-co://", "-F", "raw", a, "1440K")
    got = run("create", "-f", "qcow2", "-b", "null-co://", "-F", "raw", b, "1440K")
    assert (got.code, got.out.replace(str(b), "X")) == (want.code, want.out.replace(str(a), "X")) and want.code == 0
    assert filecmp.cmp(a, b, shallow=False)
    assert run("map", "--output=json", b).out == qemu(qemu_img, "map", "--output=json", a).out


@pytest.mark.parametrize("args", [
    ["info", "--image-opts", "data-file.filename=x.data,file.filename=x.qcow2"],
    ["info", "--output=json", 'json:{"file": {"filename": "x.qcow2"}, "data-file": {"filename": "x.data"}}'],
    ["info", 'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "x.qcow2"}, '
             '"data-file": {"driver": "file", "filename": "x.data"}}'],
], ids=["image-opts", "json-output", "json-drivers"])
def test_a_data_file_child_leaves_the_name_the_file(tmp_path, qemu_img, args):
    """QEMU names a node by its primary child; a data-file child does not make it json:."""
    assert qemu(qemu_img, "create", "-q", "-f", "qcow2", "-o", "data_file=x.data", "x.qcow2", "1M",
                cwd=tmp_path).code == 0
    want = qemu(qemu_img, *args, cwd=tmp_path)
    got = run(*args, cwd=tmp_path)
    assert want.code == 0 and "x.qcow2" in want.out
    assert (got.code, got.out, as_qemu(got.err)) == (want.code, want.out, want.err)
