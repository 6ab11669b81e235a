"""QEMU as the judge of persistent bitmaps: qemu-img info's bitmap list, and the dirty ranges
qemu-nbd exports for a bitmap (``qemu-nbd -r -B NAME`` + ``nbdinfo --map=qemu:dirty-bitmap:NAME``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

from tests.conftest import skip_or_fail


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        skip_or_fail(f"{name} is")
    return path  # type: ignore[return-value]


def img(*args) -> subprocess.CompletedProcess:
    return subprocess.run([tool("qemu-img"), *map(str, args)], capture_output=True, text=True)


def io(path, *commands: str) -> None:
    argv = [tool("qemu-io"), "-f", "qcow2"]
    for c in commands:
        argv += ["-c", c]
    p = subprocess.run([*argv, str(path)], capture_output=True, text=True)
    assert p.returncode == 0 and "error" not in (p.stdout + p.stderr).lower(), p.stdout + p.stderr


def bitmaps(path) -> list[dict]:
    """qemu-img info's format-specific bitmap list (empty when there is none)."""
    p = img("info", "-U", "--output=json", path)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout).get("format-specific", {}).get("data", {}).get("bitmaps", [])


def dirty_map(path, name: str) -> list[tuple[int, int]]:
    """The (offset, length) runs QEMU exports as dirty for bitmap ``name`` of ``path``."""
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "s")
        pid = os.path.join(d, "pid")
        server = subprocess.Popen([tool("qemu-nbd"), "-r", "-f", "qcow2", "-B", name, "-k", sock,
                                   "--pid-file", pid, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(pid):
                if server.poll() is not None:
                    raise AssertionError(f"qemu-nbd -B {name} failed: {server.communicate()[1]}")
                assert time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.02)
            p = subprocess.run([tool("nbdinfo"), "--json", f"--map=qemu:dirty-bitmap:{name}",
                                f"nbd+unix:///?socket={sock}"], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate()
    return [(e["offset"], e["length"]) for e in json.loads(p.stdout) if e["type"] & 1]


def runs_of(granules: set[int], granularity: int, size: int) -> list[tuple[int, int]]:
    """The model's dirty granules as the maximal byte runs QEMU reports (clipped to the size)."""
    out: list[tuple[int, int]] = []
    for g in sorted(granules):
        a, b = g * granularity, min(size, (g + 1) * granularity)
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], b - out[-1][0])
        else:
            out.append((a, b - a))
    return out


def granules(offset: int, length: int, granularity: int) -> set[int]:
    return set(range(offset // granularity, (offset + length - 1) // granularity + 1)) if length else set()


def assert_clean(path) -> None:
    p = img("check", path)
    assert p.returncode == 0 and "No errors were found" in p.stdout, p.stdout + p.stderr
