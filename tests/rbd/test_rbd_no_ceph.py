"""What needs no cluster: name parsing as QEMU's parser splits names, and the one-line error when
librbd is missing (the rest of qcowpy unaffected)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qcowpy.block.rbdspec import from_options, parse_filename
from qcowpy.errors import InvalidArgument
from tests.rbd.conftest import REPO


@pytest.mark.parametrize("name, expected", [
    # (pool, namespace, image, snapshot, conf, user, keypairs): QEMU's qemu_rbd_parse_filename rules
    ("rbd:p/i", ("p", "", "i", None, None, None, [])),
    ("rbd:p/ns/i@s", ("p", "ns", "i", "s", None, None, [])),
    ("rbd:p/i:id=admin:conf=/etc/c\\:x", ("p", "", "i", None, "/etc/c:x", "admin", [])),
    ("rbd:p/i:mon_host=a\\:1\\;b\\:2:rbd_cache=false", ("p", "", "i", None, None, None,
                                                       [("mon_host", "a:1;b:2"), ("rbd_cache", "false")])),
    ("rbd:p\\/q/i\\@j", ("p/q", "", "i@j", None, None, None, [])),
])
def test_filename_parsing(name, expected):
    loc = parse_filename(name)
    assert (loc.pool, loc.namespace, loc.image, loc.snapshot, loc.conf, loc.user, loc.keypairs) == expected


@pytest.mark.parametrize("name, message", [
    ("rbd:pool", "Pool name is required"),
    ("rbd:p/i:conf", "conf option conf has no value"),
])
def test_filename_errors(name, message):
    with pytest.raises(InvalidArgument, match=message):
        parse_filename(name)


def test_options_and_display_name():
    loc = from_options({"driver": "rbd", "pool": "p", "image": "i", "server": {"0": {"host": "h", "port": "1"}},
                        "user": "u"})
    assert loc.servers == [("h", "1")] and loc.user == "u"
    assert loc.display_name() == \
        'json:{"driver": "raw", "file": {"pool": "p", "image": "i", "server.0.host": "h", "driver": "rbd", ' \
        '"server.0.port": "1", "user": "u"}}'  # as qemu-img prints it: test_rbd_cli checks that



def test_missing_librbd_is_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), QCOWPY_LIBRBD=str(tmp_path / "librbd.so.1"))
    p = subprocess.run([sys.executable, "-m", "qcowpy", "info", "rbd:rbd/disk"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "rbd support needs Ceph's client libraries" in p.stderr, p.stderr
    raw = tmp_path / "x.raw"
    p = subprocess.run([sys.executable, "-m", "qcowpy", "create", "-f", "raw", str(raw), "1M"], capture_output=True,
                       text=True, env=env, timeout=60)
    assert p.returncode == 0 and raw.stat().st_size == 1 << 20
