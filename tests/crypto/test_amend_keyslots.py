"""LUKS key-slot amendment (qemu-img amend's encrypt.* options) against qemu-img amend and
qemu-io: slots qcowpy adds open in QEMU, slots QEMU adds open in qcowpy, erased ones do not."""
from __future__ import annotations

import pytest

import qcowpy
from qcowpy.crypto.secret import SECRETS
from qcowpy.tools.encrypt_amend import amend_encryption
from tests.crypto.helpers import ITER, qemu_check, qemu_create, qemu_io, run, run_timed, secret_arg, spec, tools

pytestmark = pytest.mark.interop


@pytest.fixture
def secrets():
    SECRETS.clear()
    for sid, value in (("s0", b"first"), ("s1", b"second"), ("s2", b"third")):
        SECRETS.add(sid, value)
    yield
    SECRETS.clear()


def _qemu_opens(path, password: str) -> bool:
    _, io = tools()
    p = run(io, *secret_arg(password), "--image-opts", spec(path), "-c", "read -P 0x42 0 64k", check=False)
    return p.returncode == 0 and "Pattern verification failed" not in p.stdout


def test_add_and_erase_keyslots_both_ways(tmp_path, secrets):
    qemu_img, _ = tools()
    img = tmp_path / "k.qcow2"
    qemu_create(img, "first", f"encrypt.format=luks,encrypt.key-secret=s0,{ITER}", "1M")
    qemu_io(img, "first", "write -P 0x42 0 64k")
    with qcowpy.open(str(img), "r+", secret="first") as dev:
        amend_encryption(dev, {"encrypt.state": "active", "encrypt.new-secret": "s1", "encrypt.iter-time": "10"})
    assert _qemu_opens(img, "second") and _qemu_opens(img, "first")
    assert qemu_check(img, "second").returncode == 0
    info = qcowpy.open(str(img), secret="second")
    with info:
        slots = info.format_info().encrypt["slots"]
    assert [s["active"] for s in slots] == [True, True] + [False] * 6
    # QEMU adds slot 5 with a third passphrase; qcowpy opens with it
    p = run_timed(qemu_img, "amend", *secret_arg("first"), *secret_arg("third", "s2"), "--image-opts", spec(img),
                  "-o", "encrypt.state=active,encrypt.new-secret=s2,encrypt.keyslot=5,encrypt.iter-time=10")
    assert p.returncode == 0, p.stderr
    with qcowpy.open(str(img), secret="third") as dev:
        assert dev.pread(65536, 0) == b"\x42" * 65536
    # erase by old secret: QEMU no longer opens with it
    with qcowpy.open(str(img), "r+", secret="second") as dev:
        amend_encryption(dev, {"encrypt.state": "inactive", "encrypt.old-secret": "s0"})
    assert not _qemu_opens(img, "first") and _qemu_opens(img, "second") and _qemu_opens(img, "third")
    with pytest.raises(qcowpy.QcowError, match="Invalid password, cannot unlock any keyslot"):
        qcowpy.open(str(img), secret="first")
    # erase by index
    with qcowpy.open(str(img), "r+", secret="third") as dev:
        amend_encryption(dev, {"encrypt.state": "inactive", "encrypt.keyslot": "1"})
    assert not _qemu_opens(img, "second") and _qemu_opens(img, "third")
    assert qemu_check(img, "third").returncode == 0
    q = run(qemu_img, "info", "--output=json", img).stdout
    assert '"active": true' in q and q.count('"active": true') == 1


@pytest.mark.parametrize("values,message", [
    ({"encrypt.state": "active"}, "'new-secret' is required to activate a keyslot"),
    ({"encrypt.state": "active", "encrypt.new-secret": "s1", "encrypt.old-secret": "s0"},
     "'old-secret' must not be given when activating keyslots"),
    ({"encrypt.state": "active", "encrypt.new-secret": "s1", "encrypt.keyslot": "0"},
     "Refusing to overwrite active keyslot 0 - please erase it first"),
    ({"encrypt.state": "active", "encrypt.new-secret": "s1", "encrypt.keyslot": "8"},
     "Invalid keyslot 8 specified, must be between 0 and 7"),
    ({"encrypt.state": "inactive", "encrypt.keyslot": "0"},
     "Attempt to erase the only active keyslot 0 which will erase all the data in the image irreversibly - "
     "refusing operation"),
    ({"encrypt.state": "inactive", "encrypt.keyslot": "3"}, "Given keyslot 3 is already erased (inactive) "),
    ({"encrypt.state": "inactive", "encrypt.old-secret": "s1"},
     "No keyslots match given (old) password for erase operation"),
    ({"encrypt.state": "inactive", "encrypt.new-secret": "s1"}, "'new-secret' must not be given when erasing keyslots"),
    ({"encrypt.state": "inactive", "encrypt.iter-time": "10"}, "'iter-time' must not be given when erasing keyslots"),
    ({"encrypt.state": "inactive"}, "To erase keyslot(s), either explicit keyslot index or the password currently "
                                    "contained in them must be given"),
    ({"encrypt.state": "on"}, "Parameter 'state' does not accept value 'on'"),
    ({"encrypt.new-secret": "s1"}, "Parameter 'state' is missing"),
])
def test_amend_refusals_match_qemu(tmp_path, secrets, values, message):
    qemu_img, _ = tools()
    img = tmp_path / "r.qcow2"
    qemu_create(img, "first", f"encrypt.format=luks,encrypt.key-secret=s0,{ITER}", "1M")
    before = img.read_bytes()
    with qcowpy.open(str(img), "r+", secret="first") as dev:
        with pytest.raises(qcowpy.QcowError) as e:
            amend_encryption(dev, values)
    assert str(e.value) == message
    opts = ",".join(f"{k}={v}" for k, v in values.items())
    p = run(qemu_img, "amend", *secret_arg("first"), *secret_arg("second", "s1"), "--image-opts", spec(img),
            "-o", opts, check=False)
    assert p.returncode == 1 and p.stderr == f"qemu-img: {message}\n"
    assert img.read_bytes() == before


def test_amend_on_unencrypted_and_aes_images(tmp_path, secrets):
    plain = tmp_path / "p.qcow2"
    qcowpy.create(str(plain), 1 << 20)
    with qcowpy.open(str(plain), "r+") as dev:
        with pytest.raises(qcowpy.QcowError, match="Can't amend encryption options - encryption not present"):
            amend_encryption(dev, {"encrypt.state": "active", "encrypt.new-secret": "s1"})
    aes = tmp_path / "a.qcow2"
    qcowpy.create(str(aes), 1 << 20, encrypt_format="aes", secret="first")
    with qcowpy.open(str(aes), "r+", secret="first") as dev:
        with pytest.raises(qcowpy.QcowError, match="Only LUKS encryption options can be amended"):
            amend_encryption(dev, {"encrypt.state": "active", "encrypt.new-secret": "s1"})
