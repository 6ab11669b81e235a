"""Start-up stays small: a command imports only what it uses (speed targets live in bench/;
this checks the mechanism, which a stray top-level import would silently undo)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["cryptography", "zstandard", "ssl", "concurrent.futures", "ctypes", "qcowpy.block.nbd",
         "qcowpy.block.rbd", "qcowpy.block.librbd", "qcowpy.cli.nbd", "qcowpy.cli.storage_daemon",
         "qcowpy.export", "qcowpy.emu", "qcowpy.crypto.luks", "qcowpy.qcow2.create"]

SCRIPT = """
import json, sys
from qcowpy.cli.main import main
code = main(sys.argv[1:])
print(json.dumps([code, sorted(sys.modules)]))
"""


def _modules(*args: str) -> tuple[int, set[str]]:
    p = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True)
    code, mods = json.loads(p.stdout.splitlines()[-1])
    return code, set(mods)


def _loaded(mods: set[str], name: str) -> bool:
    return name in mods or any(m.startswith(name + ".") for m in mods)


@pytest.mark.parametrize("args", [["info", "IMG"], ["map", "IMG"], ["check", "IMG"], ["--version"]],
                         ids=lambda a: a[0])
def test_plain_commands_load_no_optional_subsystem(tmp_path, args):
    img = tmp_path / "a.qcow2"
    code, _ = _modules("create", "-q", "-f", "qcow2", str(img), "1G")
    assert code == 0
    code, mods = _modules(*[str(img) if a == "IMG" else a for a in args])
    assert code == 0
    assert [m for m in HEAVY if _loaded(mods, m)] == []


def test_the_subsystems_load_when_used(tmp_path):
    """The same modules do load where they are needed: zstd clusters, an encrypted image."""
    raw = tmp_path / "data.raw"
    raw.write_bytes(b"zstd please " * 100000)
    code, mods = _modules("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", str(raw), str(tmp_path / "z"))
    assert code == 0 and _loaded(mods, "zstandard") and _loaded(mods, "qcowpy.qcow2.create")
    enc = str(tmp_path / "e")
    code, mods = _modules("create", "-q", "--object", "secret,id=s,data=pw", "-f", "qcow2", "-o",
                          "encrypt.format=luks,encrypt.key-secret=s,encrypt.iter-time=10", enc, "1M")
    assert code == 0 and _loaded(mods, "cryptography")
    code, mods = _modules("info", enc)
    assert code == 0 and _loaded(mods, "qcowpy.crypto.luks")  # info reads the LUKS header


def test_a_raw_copy_loads_no_qcow2_engine_and_version_reads_no_metadata(tmp_path):
    """convert between raw images (as into or out of rbd) needs neither the qcow2 engine nor the
    cipher library; --version prints the package's own version without importlib.metadata."""
    raw = tmp_path / "a.raw"
    raw.write_bytes(b"x" * 65536)
    code, mods = _modules("convert", "-f", "raw", "-O", "raw", str(raw), str(tmp_path / "b.raw"))
    assert code == 0
    assert [m for m in ("qcowpy.qcow2.image", "qcowpy.qcow2.create", "qcowpy.format.header", "cryptography")
            if _loaded(mods, m)] == []
    code, mods = _modules("--version")
    assert code == 0 and not _loaded(mods, "importlib.metadata")


def test_version_is_the_project_version():
    import tomllib
    from pathlib import Path

    import qcowpy
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert qcowpy.__version__ == project["version"]
