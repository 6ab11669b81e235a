"""Protocol corners and hostile clients, byte by byte over a raw socket against ``qcowpy nbd``.

Every test ends by checking the server still serves a well-behaved client.
"""
from __future__ import annotations

import os
import random
import struct
import time

import pytest

from qcowpy.block import nbdproto as P

from .rawclient import RawClient, name_and_queries

SIZE = 8 << 20


@pytest.fixture
def server(qemu, start_server, tmp_path):
    img = tmp_path / "p.qcow2"
    qemu.create(img, SIZE)
    qemu.io(img, "write -P 0x5a 0 64k")
    srv = start_server("qcowpy", img, "-t", "-e", "0", "-A", "-x", "exp", "-D", "desc", name="exp")
    yield srv
    assert srv.proc.poll() is None, "server died"
    assert srv.stop() == 0
    qemu.assert_clean(img)


def healthy(srv) -> None:
    c = RawClient(srv.sock)
    c.go("exp", structured=False)
    token = os.urandom(4096)
    c.request(P.CMD_WRITE, 4 << 20, 4096, handle=76, data=token)
    assert c.reply()[:2] == (76, 0)
    c.request(P.CMD_READ, 4 << 20, 4096, handle=77)
    handle, err, chunks = c.reply(4096)
    assert (handle, err) == (77, 0) and chunks[0][1] == token
    c.request(P.CMD_DISC)
    c.close()


def test_options_before_go(server):
    c = RawClient(server.sock)
    c.greet()
    c.option(99)
    assert c.option_reply()[1] == P.REP_ERR_UNSUP
    c.option(P.OPT_LIST)
    replies = c.replies_until_final()
    assert replies[0] == (P.REP_SERVER, struct.pack(">I", 3) + b"expdesc") and replies[-1][0] == P.REP_ACK
    c.option(P.OPT_STARTTLS)
    assert c.option_reply()[1] == P.REP_ERR_POLICY
    c.option(P.OPT_SET_META_CONTEXT, name_and_queries("exp", ("base:allocation",)))
    assert c.option_reply()[1] == P.REP_ERR_INVALID  # structured replies come first
    c.option(P.OPT_STRUCTURED_REPLY)
    assert c.option_reply()[1] == P.REP_ACK
    c.option(P.OPT_STRUCTURED_REPLY)
    assert c.option_reply()[1] == P.REP_ERR_INVALID
    c.option(P.OPT_LIST_META_CONTEXT, name_and_queries("exp", ("qemu:",)))
    assert [r[1][4:] for r in c.replies_until_final()] == [b"qemu:allocation-depth", b""]
    c.option(P.OPT_LIST_META_CONTEXT, name_and_queries("nope", ()))
    assert c.option_reply()[1] == P.REP_ERR_UNKNOWN
    c.option(P.OPT_INFO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert c.option_reply()[1] == P.REP_ERR_UNKNOWN
    c.option(P.OPT_INFO, struct.pack(">I", 99) + b"exp")  # name length past the option
    assert c.option_reply()[1] == P.REP_ERR_INVALID
    c.sock.sendall(P.OPTION.pack(P.IHAVEOPT, P.OPT_GO, 1 << 20) + bytes(1 << 20))
    assert c.option_reply()[1] == P.REP_ERR_TOO_BIG
    c.option(P.OPT_INFO, struct.pack(">I", 3) + b"exp" + struct.pack(">HH", 1, P.INFO_NAME))
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in c.replies_until_final() if t == P.REP_INFO}
    assert infos[P.INFO_NAME] == b"exp" and infos[P.INFO_DESCRIPTION] == b"desc"
    assert struct.unpack(">QH", infos[P.INFO_EXPORT])[0] == SIZE
    assert struct.unpack(">III", infos[P.INFO_BLOCK_SIZE]) == (1, 4096, 32 << 20)
    c.option(P.OPT_ABORT)
    assert c.option_reply()[1] == P.REP_ACK
    assert c.closed()
    healthy(server)


def test_export_name_and_no_zeroes(server):
    for flags, tail in ((P.FLAG_FIXED_NEWSTYLE, 124), (P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 0)):
        c = RawClient(server.sock)
        c.greet(flags)
        c.option(P.OPT_EXPORT_NAME, b"exp")
        size, eflags = struct.unpack(">QH", c.recv(10))
        assert size == SIZE and eflags & P.FLAG_SEND_FLUSH and c.recv(tail) == bytes(tail)
        c.request(P.CMD_DISC)
        assert c.closed()
    c = RawClient(server.sock)
    c.greet()
    c.option(P.OPT_EXPORT_NAME, b"other")
    assert c.closed()  # EXPORT_NAME has no error reply: the server hangs up
    healthy(server)


def test_transmission_errors(server):
    c = RawClient(server.sock)
    ids = c.go("exp", contexts=("base:allocation", "qemu:allocation-depth"))
    assert set(ids.values()) == {"base:allocation", "qemu:allocation-depth"}
    for cmd, off, length, flags, err in [
        (P.CMD_READ, SIZE - 512, 4096, 0, P.EINVAL), (P.CMD_READ, 0, (32 << 20) + 1, 0, P.EINVAL),
        (42, 0, 0, 0, P.EINVAL), (P.CMD_READ, 0, 512, P.CMD_FLAG_NO_HOLE, P.EINVAL),
        (P.CMD_WRITE_ZEROES, SIZE, 512, 0, P.ENOSPC), (P.CMD_BLOCK_STATUS, 0, 0, 0, P.EINVAL),
        (P.CMD_TRIM, 2 ** 64 - 512, 1024, 0, P.EINVAL),
    ]:
        c.request(cmd, off, length, flags, handle=cmd + 1000)
        handle, got, chunks = c.reply()
        assert (handle, got) == (cmd + 1000, err), (cmd, off, length)
    c.request(P.CMD_BLOCK_STATUS, 0, SIZE, P.CMD_FLAG_REQ_ONE, handle=5)
    _, err, chunks = c.reply()
    assert err == 0 and len(chunks) == 2
    for _, body in chunks:
        assert len(body) == 4 + 8  # one extent per context
    c.request(P.CMD_WRITE, 0, (32 << 20) + 1, handle=6)  # its payload cannot be skipped: error, then hang up
    assert c.reply()[:2] == (6, P.EINVAL)
    assert c.closed()
    healthy(server)


def test_pipelined_requests_complete_and_match(server):
    c = RawClient(server.sock)
    c.go("exp", structured=False)
    rng = random.Random(1)
    expect = {}
    offsets = rng.sample(range(SIZE // 4096), 200)  # in-flight writes may land in any order: no overlaps
    for h in range(200):
        off = offsets[h] * 4096
        data = bytes([h % 251 + 1]) * 4096
        c.request(P.CMD_WRITE, off, 4096, P.CMD_FLAG_FUA if h % 7 == 0 else 0, handle=h, data=data)
        expect[off] = data
    got = {c.reply()[0] for _ in range(200)}
    assert got == set(range(200))
    items = list(expect.items())
    for batch in range(0, len(items), 32):  # a batch's replies fit in the socket buffers
        for h in range(batch, min(batch + 32, len(items))):
            c.request(P.CMD_READ, items[h][0], 4096, handle=h)
        for _ in range(batch, min(batch + 32, len(items))):
            handle, err, chunks = c.reply(4096)
            assert err == 0 and chunks[0][1] == items[handle][1]
    c.request(P.CMD_FLUSH, handle=9)
    assert c.reply()[:2] == (9, 0)


def test_a_client_that_never_reads_stalls_only_itself(server):
    greedy = RawClient(server.sock)
    greedy.go("exp", structured=False)
    greedy.sock.setblocking(False)
    sent = 0
    req = P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, 1 << 20)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            sent += greedy.sock.send(req * 64)
        except BlockingIOError:
            time.sleep(0.01)
    assert sent > 0
    healthy(server)
    rss = int(open(f"/proc/{server.proc.pid}/status").read().split("VmRSS:")[1].split()[0])
    assert rss < 400 * 1024, f"server RSS {rss} KiB"
    greedy.close()
    healthy(server)


def _fuzz_once(srv, rng: random.Random) -> None:
    c = RawClient(srv.sock, timeout=5)
    try:
        phase = rng.random()
        if phase < 0.4:
            c.recv(18)
            blob = bytearray(struct.pack(">I", rng.choice([0, 1, 3, 0xFFFFFFFF])))
            for _ in range(rng.randrange(1, 6)):
                opt = rng.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, rng.randrange(1 << 32)])
                body = os.urandom(rng.choice([0, 3, 4, 12, 100]))
                length = rng.choice([len(body), len(body) + 5, rng.randrange(1 << 32)])
                blob += P.OPTION.pack(rng.choice([P.IHAVEOPT, P.IHAVEOPT, 0]), opt, length) + body
        else:
            c.go("exp", structured=rng.random() < 0.5, contexts=("base:allocation",) if rng.random() < .5 else ())
            blob = bytearray()
            for _ in range(rng.randrange(1, 8)):
                cmd = rng.choice([0, 1, 3, 4, 5, 6, 7, rng.randrange(1 << 16)])
                length = rng.choice([0, 512, 4096, rng.randrange(1 << 32)])
                offset = rng.choice([0, SIZE - 512, SIZE, rng.randrange(1 << 64)])
                magic = P.REQUEST_MAGIC if rng.random() < 0.9 else rng.randrange(1 << 32)
                blob += P.REQUEST.pack(magic, rng.randrange(1 << 16) if rng.random() < .3 else 0, cmd, 1, offset,
                                       length)
                if cmd == 1 and length <= 4096:
                    blob += os.urandom(length if rng.random() < 0.8 else length // 2)
        cut = rng.choice([len(blob), rng.randrange(len(blob) + 1)])
        c.sock.sendall(bytes(blob[:cut]))
        if rng.random() < 0.5:
            c.sock.settimeout(0.05)
            try:
                while c.sock.recv(65536):
                    pass
            except OSError:
                pass
    except (OSError, EOFError, AssertionError):
        pass
    finally:
        c.close()


@pytest.mark.parametrize("rounds", [pytest.param(150, id="short"),
                                    pytest.param(3000, id="long", marks=pytest.mark.torture)])
def test_fuzz_handshake_and_transmission(server, rounds):
    rng = random.Random(rounds)
    start = time.monotonic()
    for i in range(rounds):
        _fuzz_once(server, rng)
        if i % 50 == 49:
            healthy(server)
    healthy(server)
    assert time.monotonic() - start < rounds * 0.5


def test_replies_come_back_out_of_order(server):
    """An 8 MiB read goes to the worker pool; a 4 KiB read sent after it is answered on the reader
    thread, so (nearly always) first. Every reply carries its own request's handle and data."""
    c = RawClient(server.sock)
    c.go("exp", structured=False)
    sizes = {1: 8 << 20, 2: 4096}
    order = []
    for _ in range(10):
        c.request(P.CMD_READ, 0, sizes[1], handle=1)
        c.request(P.CMD_READ, 4 << 20, sizes[2], handle=2)
        for _ in range(2):
            magic, err, handle = struct.unpack(">IIQ", c.recv(16))
            assert (magic, err) == (P.SIMPLE_REPLY_MAGIC, 0) and handle in sizes
            data = c.recv(sizes[handle])
            assert data[:4096] == (b"\x5a" * 4096 if handle == 1 else data[:4096])
            order.append(handle)
    assert sorted(order) == [1] * 10 + [2] * 10
    assert order[::2].count(2) >= 1, f"the small read never overtook the large one: {order}"
