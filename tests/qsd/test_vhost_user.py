"""The vhost-user-blk back-end driven by a scripted front-end (tests/qsd/frontend.py): every
request type on several queues with and without indirect tables, checked against qemu-io's view
of the image; then front-ends and guests that break the rules, after which the daemon still
serves and the image is intact."""
from __future__ import annotations

import os
import struct

import pytest

from qcowpy.export.vhost_user import protocol as P

from .frontend import F_EVENT_IDX, F_INDIRECT, FrontEnd

IN, OUT, FLUSH, GET_ID, DISCARD, WZ = 0, 1, 4, 8, 11, 13


@pytest.fixture
def served(qemu, daemons, tmp_path):
    img, sock = str(tmp_path / "a.qcow2"), str(tmp_path / "vu.sock")
    qemu.create(img, "16M")
    qemu.io(img, "write -P 0x11 0 1M")
    d = daemons(["--blockdev", f"driver=qcow2,node-name=n,file.driver=file,file.filename={img}",
                 "--export", f"type=vhost-user-blk,id=vu0,node-name=n,addr.type=unix,addr.path={sock},"
                             "writable=on,num-queues=2"], [sock])
    return img, sock, d


@pytest.mark.parametrize("features", [None, ~((1 << F_EVENT_IDX) | (1 << F_INDIRECT))],
                         ids=["event-idx+indirect", "plain"])
def test_requests_on_two_queues(served, qemu, features):
    img, sock, d = served
    fe = FrontEnd(sock, num_queues=2, features=features)
    assert fe.get_u64(P.GET_QUEUE_NUM) == 2
    fe.setup()
    cfg = fe.config()
    capacity, _, seg_max = struct.unpack_from("<QII", cfg)
    assert capacity == (16 << 20) // 512 and struct.unpack_from("<H", cfg, 34)[0] == 2
    indirect = features is None
    assert fe.request(0, IN, 0, read=4096, indirect=indirect) == (0, b"\x11" * 4096)
    assert fe.request(1, OUT, 8, b"\x22" * 8192, indirect=indirect)[0] == 0
    assert fe.request(0, OUT, 4096, b"\x33" * 512)[0] == 0
    assert fe.request(1, IN, 8, read=8192) == (0, b"\x22" * 8192)
    # a read cut in page-sized pieces, as Linux issues them (the engine's bounce-buffer path)
    assert fe.request(1, IN, 0, read=12288, pieces=6, indirect=indirect) == \
        (0, b"\x11" * 4096 + b"\x22" * 8192)
    assert fe.request(0, FLUSH, 0)[0] == 0
    status, ident = fe.request(1, GET_ID, 0, read=20)
    assert status == 0 and ident.rstrip(b"\0") == b"vu0"
    assert fe.request(0, WZ, 0, struct.pack("<QII", 2048, 2048, 0))[0] == 0     # 1 MiB at 1 MiB
    assert fe.request(0, DISCARD, 0, struct.pack("<QII", 4096, 128, 0))[0] == 0  # the 0x33 sector
    # out of range / unsupported / misaligned complete with an error status, nothing else happens
    assert fe.request(0, IN, (16 << 20) // 512, read=512)[0] == 1
    assert fe.request(0, 99, 0)[0] == 2
    for _ in range(40):  # wrap the 16-entry rings a few times
        assert fe.request(1, IN, 0, read=512)[0] == 0
    fe.close()
    code, err = d.terminate()
    assert code == 0, err
    qemu.assert_clean(img)
    qemu.io(img, "read -P 0x11 0 4k", "read -P 0x22 4k 8k", "read -P 0x11 12k 1012k",
            "read -P 0 1M 1M", "read -P 0 2M 64k")


def _still_serves(sock: str) -> None:
    fe = FrontEnd(sock)
    fe.setup()
    assert fe.request(0, IN, 0, read=512) == (0, b"\x11" * 512)
    fe.close()


HOSTILE_SETUP = {
    "region past the end of its memfd": lambda fe: fe.setup(region_size=64 << 20),
    "vring index out of range": lambda fe: fe.send(P.SET_VRING_NUM, P.STATE.pack(200, 16)),
    "vring size not a power of two": lambda fe: fe.send(P.SET_VRING_NUM, P.STATE.pack(0, 100)),
    "payload larger than any message": lambda fe: fe.sock.sendall(P.HEADER.pack(P.SET_FEATURES, 1, 1 << 30)),
    "short payload": lambda fe: fe.send(P.SET_VRING_ADDR, b"\0" * 8),
    "unknown request": lambda fe: fe.send(77),
    "message that stops half way": lambda fe: fe.sock.sendall(P.HEADER.pack(P.SET_VRING_ADDR, 1, 40) + bytes(8)),
    "memory table with too many regions": lambda fe: fe.send(P.SET_MEM_TABLE, struct.pack("<II", 9, 0) + bytes(288)),
    "ring outside memory": lambda fe: (fe.send(P.SET_VRING_ADDR, P.ADDR.pack(0, 0, 1, 2, 3, 0)),
                                       fe.send(P.SET_VRING_KICK, P.U64.pack(0), [fe.kicks[0]])),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_SETUP))
def test_hostile_front_end_is_disconnected(served, qemu, name):
    img, sock, d = served
    fe = FrontEnd(sock)
    try:
        HOSTILE_SETUP[name](fe)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the back-end hung up before the front-end had sent everything: what we want
    _dropped_but_serving(fe, d, sock, img, qemu)
    qemu.io(img, "read -P 0 1M 15M")


def _dropped_but_serving(fe: FrontEnd, d, sock: str, img: str, qemu) -> None:
    """The back-end hung up on ``fe``, serves a new front-end, stops cleanly, and the image is intact."""
    assert fe.closed()
    fe.close()
    assert d.proc.poll() is None
    _still_serves(sock)
    code, err = d.terminate()
    assert code == 0, err
    qemu.assert_clean(img)
    qemu.io(img, "read -P 0x11 0 1M")


HOSTILE_GUEST = {
    "buffer outside guest memory": [(0xFFFF0000, 16, 0x1, 1), (0x200000, 1, 0x2, 0)],
    "descriptor loop": [(0x200000, 16, 0x1, 1), (0x200000, 16, 0x1, 0)],
    "next out of range": [(0x200000, 16, 0x1, 99)],
    "readable after writable": [(0x200000, 16, 0x2 | 0x1, 1), (0x200000, 16, 0x0, 0)],
    "indirect table outside memory": [(0xFFFF0000, 32, 0x4, 0)],
    "missing status": [(0x200000, 16, 0x0, 0)],
}


@pytest.mark.parametrize("name", sorted(HOSTILE_GUEST))
def test_hostile_guest_stops_only_its_queue(served, qemu, name):
    img, sock, d = served
    fe = FrontEnd(sock)
    fe.setup()
    fe.mem[0x200000:0x200010] = struct.pack("<IIQ", OUT, 0, 0)  # a write of nothing to sector 0
    fe.chain(0, [], raw=HOSTILE_GUEST[name])
    assert not fe.wait_used(0, 1, timeout=1)  # never completed
    assert not fe.closed(timeout=0.2)  # only the queue stopped
    fe.close()
    _still_serves(sock)
    code, err = d.terminate()
    assert code == 0, err
    qemu.assert_clean(img)
    qemu.io(img, "read -P 0x11 0 1M")


def test_sigterm_with_a_front_end_stalled_mid_message(served, qemu):
    img, sock, d = served
    fe = FrontEnd(sock)
    fe.sock.sendall(P.HEADER.pack(P.SET_VRING_ADDR, 1, 40) + bytes(8))
    code, err = d.terminate(timeout=10)
    assert code == 0, err
    fe.close()
    qemu.assert_clean(img)


def test_ring_stop_and_restart_keeps_the_indices(served, qemu):
    """GET_VRING_BASE stops a ring and reports the next available index; the front-end starts it
    again from there (as QEMU does around a device stop) and requests keep completing."""
    import os
    img, sock, d = served
    fe = FrontEnd(sock)
    fe.setup()
    for _ in range(5):
        assert fe.request(0, IN, 0, read=512)[0] == 0
    fe.send(P.GET_VRING_BASE, P.STATE.pack(0, 0))
    assert P.STATE.unpack(fe.recv()[1]) == (0, 5)
    fe.kicks[0], fe.calls[0] = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)  # the old ones were closed
    fe.send(P.SET_VRING_BASE, P.STATE.pack(0, 5))
    fe.send(P.SET_VRING_CALL, P.U64.pack(0), [fe.calls[0]])
    fe.send(P.SET_VRING_KICK, P.U64.pack(0), [fe.kicks[0]])
    for _ in range(20):  # the used index continues from guest memory, across the 16-entry wrap
        assert fe.request(0, IN, 0, read=512) == (0, b"\x11" * 512)
    fe.close()
    assert d.terminate()[0] == 0
    qemu.assert_clean(img)


def test_sealable_memfd_is_sealed_against_shrinking(served, qemu):
    """A memfd that allows sealing gets F_SEAL_SHRINK at SET_MEM_TABLE: the front-end can no
    longer shrink it under the daemon's mapping (which would raise SIGBUS in the daemon)."""
    import fcntl
    img, sock, d = served
    fe = FrontEnd(sock, sealable=True)
    fe.setup()
    assert fe.request(0, IN, 0, read=512) == (0, b"\x11" * 512)
    assert fcntl.fcntl(fe.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
    with pytest.raises(PermissionError):
        os.ftruncate(fe.fd, 1 << 20)
    assert fe.request(0, IN, 0, read=512) == (0, b"\x11" * 512)
    fe.close()
    code, err = d.terminate()
    assert code == 0, err
    qemu.assert_clean(img)


def test_unsealable_memfd_shrunk_under_a_request_drops_only_the_front_end(served, qemu):
    """A memfd without sealing, shrunk after SET_MEM_TABLE, then a request whose buffer lies in
    the part cut off: the daemon must not touch it (SIGBUS would kill it). It drops that front-end
    and keeps serving others; the image is intact."""
    img, sock, d = served
    fe = FrontEnd(sock)
    fe.setup()
    assert fe.request(0, IN, 0, read=512) == (0, b"\x11" * 512)
    os.ftruncate(fe.fd, 2 << 20)                 # the region still claims 4 MiB
    # header and status in the part cut off (reading the header there is what raised SIGBUS
    # before the guard: the daemon died with -7)
    fe.chain(0, [], raw=[(0x300000, 16, 0x1, 1), (0x1F0000, 4096, 0x2 | 0x1, 2), (0x301000, 1, 0x2, 0)])
    _dropped_but_serving(fe, d, sock, img, qemu)
