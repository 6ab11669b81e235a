"""Faults on the cluster side and on ours: an OSD that stops answering in the middle of a convert
(bounded failure, one line; the rerun completes), and a flush that was acknowledged before
qcowpy was SIGKILLed (the data is on the cluster). Oracle: qemu-img/qemu-io reading the image."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.rbd.conftest import env, qcowpy, qemu_img, qemu_io


def test_osd_stopped_mid_convert_fails_bounded_and_rerun_completes(ceph, image, tmp_path):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        for i in range(96):
            f.write(bytes([i + 1]) * (1 << 20))
    target = ceph.name(image, rados_osd_op_timeout="3")
    proc = subprocess.Popen([sys.executable, "-m", "qcowpy", "convert", "-p", "-O", "raw", str(src), target],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    paused = False
    try:
        progress = b""
        while True:  # wait until some data went out, then stop the OSD answering
            c = proc.stdout.read(1)
            if not c:
                break
            progress += c
            if c == b"\r" and b"(0.00/100%)" not in progress.split(b"\r")[-2]:
                ceph.pause_osd()
                paused = True
                break
        assert paused, f"convert finished before the OSD could be stopped: {progress!r}"
        t = time.monotonic()
        _, err = proc.communicate(timeout=90)
        elapsed = time.monotonic() - t
    finally:
        if paused:
            ceph.resume_osd()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcowpy: ") and "Connection timed out" in lines[0], lines
    assert elapsed < 15, elapsed  # one request wait (3 s + 2 s) and a bounded close, not one per request
    print(f"convert failed {elapsed:.1f} s after the OSD stopped")
    out = qcowpy("convert", "-n", "-O", "raw", src, target, timeout=120)
    assert out.returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "raw", src, target).returncode == 0


def test_flush_acknowledged_before_sigkill_is_on_the_cluster(ceph, image):
    name = ceph.name(image)
    qemu_img("create", "-f", "raw", name, "16M")
    script = (
        "import sys, time, qcowpy\n"
        f"d = qcowpy.open({name!r}, 'r+')\n"
        "d.pwrite(b'\\xe7' * (3 << 20), 2 << 20)\n"
        "d.pwrite(b'\\x7e' * 4096, 12 << 20)\n"
        "d.flush()\n"
        "print('flushed', flush=True)\n"
        "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line == b"flushed\n", (line, proc.stderr.read() if proc.poll() is not None else b"")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    qemu_io(name, "read -P 0xe7 2M 3M", "read -P 0x7e 12M 4k", "read -P 0 0 2M")
