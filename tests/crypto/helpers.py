"""Oracle helpers for encrypted images: qemu-img/qemu-io with ``--object secret``.

qemu-img's LUKS creation measures PBKDF2 speed on the thread's CPU clock and fails at random
on a busy machine ("Unable to get accurate CPU usage"); ``qemu_create`` retries that one step.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time

from tests.conftest import skip_or_fail

ITER = "encrypt.iter-time=10"


def tools() -> tuple[str, str]:
    img, io = shutil.which("qemu-img"), shutil.which("qemu-io")
    if not (img and io):
        skip_or_fail("qemu-img and qemu-io are")
    return img, io  # type: ignore[return-value]


def secret_arg(password: str, sid: str = "s0") -> list[str]:
    return ["--object", f"secret,id={sid},data={password}"]


def spec(path, sid: str = "s0") -> str:
    """The --image-opts string opening ``path`` with secret ``sid``."""
    return f"driver=qcow2,file.filename={path},encrypt.key-secret={sid}"


def json_name(path, sid: str = "s0") -> str:
    return "json:" + json.dumps({"driver": "qcow2", "file.filename": str(path), "encrypt.key-secret": sid})


def run(*argv, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, f"{argv}: {p.stdout}{p.stderr}"
    return p


# On a loaded machine the failure repeats (8 attempts in a row failed once under load 6 on 2
# cores): retry many times, pausing a little longer each time.
ATTEMPTS = 30


def run_timed(*argv, attempts: int = ATTEMPTS) -> subprocess.CompletedProcess:
    """A qemu-img run that measures PBKDF2 speed (LUKS create, measure, amend): retried while
    it fails with QEMU's random "Unable to get accurate CPU usage"."""
    for i in range(attempts):
        time.sleep(0.02 * i)
        p = run(*argv, check=False)
        if "Unable to get accurate CPU usage" not in p.stderr:
            return p
    raise AssertionError(f"{argv} kept failing: {p.stderr}")


def qemu_create(path, password: str, options: str, size: str = "4M", attempts: int = ATTEMPTS) -> None:
    """qemu-img create of an encrypted qcow2, retrying its flaky PBKDF2 timing step."""
    img, _ = tools()
    for i in range(attempts):
        time.sleep(0.02 * i)
        p = run(img, "create", "-q", "-f", "qcow2", *secret_arg(password), "-o", options, path, size, check=False)
        if p.returncode == 0:
            return
        assert "Unable to get accurate CPU usage" in p.stderr, p.stderr
    raise AssertionError(f"qemu-img create kept failing: {p.stderr}")


def qemu_io(path, password: str, *commands: str) -> str:
    _, io = tools()
    argv = [io, *secret_arg(password), "--image-opts"]
    for c in commands:
        argv += ["-c", c]
    p = run(*argv, spec(path))
    assert "error" not in (p.stdout + p.stderr).lower() and "fail" not in p.stdout.lower(), p.stdout + p.stderr
    return p.stdout


def qemu_raw(path, password: str, out) -> bytes:
    """The guest bytes of an encrypted image as qemu-img reads them."""
    img, _ = tools()
    run(img, "convert", "-O", "raw", *secret_arg(password), "--image-opts", spec(path), out)
    with open(out, "rb") as f:
        return f.read()


def qemu_check(path, password: str) -> subprocess.CompletedProcess:
    img, _ = tools()
    return run(img, "check", *secret_arg(password), "--image-opts", spec(path), check=False)
