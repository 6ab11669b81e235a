"""The message prefix comes from argv[0], as in QEMU: qcowpy run as ``qemu-img`` prints ``qemu-img:``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import qemu


def _launcher(tmp_path, name: str) -> str:
    from tests.iotests.runner import write_launcher
    path = write_launcher(tmp_path / "bin")
    if name != "qemu-img":
        (tmp_path / "bin" / name).symlink_to(path)
    return str(tmp_path / "bin" / name)


@pytest.mark.parametrize("args", [
    ["info", "nosuch.qcow2"],
    ["check", "nosuch.qcow2"],
    ["convert", "-O", "qcow2", "nosuch.qcow2", "out.qcow2"],
    ["create", "-f", "qcow2", "x.qcow2", "1Q"],
    ["bogus-command"],
    ["info", "--bogus-option", "x"],
])
def test_prefix_matches_qemu_img_under_its_name(tmp_path, qemu_img, args):
    ours = subprocess.run([_launcher(tmp_path, "qemu-img"), *args], capture_output=True, text=True, cwd=tmp_path)
    ref = qemu(qemu_img, *args, cwd=tmp_path)
    assert (ours.returncode, ours.stderr) == (ref.code, ref.err)


def test_prefix_follows_any_name_and_python_m_keeps_qcowpy(tmp_path):
    p = subprocess.run([_launcher(tmp_path, "myimg"), "info", "nosuch"], capture_output=True, text=True, cwd=tmp_path)
    assert p.stderr.startswith("myimg: Could not open 'nosuch'") and p.returncode == 1
    repo = str(Path(__file__).resolve().parents[2])
    p = subprocess.run([sys.executable, "-m", "qcowpy.cli.main", "info", "nosuch"], capture_output=True, text=True,
                       cwd=tmp_path, env=dict(os.environ, PYTHONPATH=repo))
    assert p.stderr.startswith("qcowpy: Could not open 'nosuch'") and p.returncode == 1
