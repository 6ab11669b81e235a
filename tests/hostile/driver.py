"""Run under resource limits in a subprocess: open a hostile image every way qcowpy can and report.

Usage: python -m tests.hostile.driver IMAGE  -> one JSON line on stdout.
"""
from __future__ import annotations

import io
import json
import resource
import sys
from contextlib import redirect_stderr, redirect_stdout


def limit(address_space: int = 1 << 30, cpu_seconds: int = 20) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))


def api(path: str) -> dict:
    import qcowpy
    from qcowpy.errors import QcowError
    try:
        with qcowpy.open(path, "r", format="qcow2") as dev:
            pos = 0
            while pos < min(dev.size, 64 << 20):
                n = min(1 << 20, dev.size - pos)
                dev.pread(n, pos)
                pos += n
            list(dev.block_status(0, min(dev.size, 64 << 20))) if hasattr(dev, "block_status") else None
        return {"ok": True}
    except QcowError as e:
        return {"ok": False, "error": str(e), "type": type(e).__name__}


def cli(*args: str) -> dict:
    from qcowpy.cli.main import main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return {"code": code, "err": err.getvalue()}


if __name__ == "__main__":
    limit()
    path, tmpout = sys.argv[1], sys.argv[2]
    res = {"api": api(path),
           "info": cli("info", "-f", "qcow2", path),
           "map": cli("map", "-f", "qcow2", "--output=json", path),
           "convert": cli("convert", "-f", "qcow2", "-O", "raw", path, tmpout),
           "compare": cli("compare", "-f", "qcow2", "-F", "qcow2", path, path),
           "check": cli("check", "-f", "qcow2", path)}
    print(json.dumps(res))
