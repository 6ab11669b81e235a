"""SIGKILL the server while a client writes: every write acknowledged with FUA, or followed by an
acknowledged FLUSH, reads back afterwards, and qemu-img check finds no corruption (leaks allowed)."""
from __future__ import annotations

import random
import signal
import threading

import pytest

from qcowpy.block import nbdproto as P

from .rawclient import RawClient

SIZE = 64 << 20
CHUNK = 64 << 10


def _write_until_killed(srv, rng: random.Random) -> list[tuple[int, int]]:
    """(offset, pattern) of every write that must survive; writes go to distinct chunks, in flight by
    fours, FUA on some, a FLUSH after every few."""
    durable: list[tuple[int, int]] = []
    pending: dict[int, tuple[int, int]] = {}  # acknowledged without FUA, waiting for a FLUSH
    slots = rng.sample(range(SIZE // CHUNK), SIZE // CHUNK)
    c = RawClient(srv.sock, timeout=10)
    try:
        c.go("", structured=False)
        handle = 0
        while slots:
            batch = {}
            for _ in range(min(4, len(slots))):
                handle += 1
                slot = slots.pop()
                pattern = handle % 250 + 1
                fua = rng.random() < 0.5
                c.request(P.CMD_WRITE, slot * CHUNK, CHUNK, P.CMD_FLAG_FUA if fua else 0, handle,
                          bytes([pattern]) * CHUNK)
                batch[handle] = (slot * CHUNK, pattern, fua)
            for _ in batch:
                h, err, _ = c.reply()
                assert err == 0
                off, pattern, fua = batch[h]
                if fua:
                    durable.append((off, pattern))
                else:
                    pending[h] = (off, pattern)
            if rng.random() < 0.3:
                handle += 1
                c.request(P.CMD_FLUSH, handle=handle)
                h, err, _ = c.reply()
                assert (h, err) == (handle, 0)
                durable.extend(pending.values())
                pending.clear()
    except (OSError, EOFError):
        pass  # the server died under us
    finally:
        c.close()
    return durable


@pytest.mark.parametrize("rounds", [pytest.param(3, id="short"),
                                    pytest.param(25, id="long", marks=pytest.mark.torture)])
def test_sigkill_keeps_acknowledged_writes(qemu, start_server, tmp_path, rounds):
    rng = random.Random(rounds)
    img = tmp_path / "crash.qcow2"
    qemu.create(img, SIZE)
    for _ in range(rounds):
        srv = start_server("qcowpy", img, "-f", "qcow2", "-t")
        timer = threading.Timer(rng.uniform(0.2, 0.6), srv.proc.send_signal, (signal.SIGKILL,))
        timer.start()
        try:
            durable = _write_until_killed(srv, rng)
        finally:
            timer.join()
        assert srv.proc.wait(20) == -signal.SIGKILL
        srv.sock.unlink()
        p = qemu.check(img)
        assert p.returncode in (0, 3), f"qemu-img check exit {p.returncode}:\n{p.stdout}{p.stderr}"
        assert durable, "the client wrote nothing durable before the kill"
        # the next round may overwrite chunks; check what this round promised now
        cmds = [f"read -P {pattern} {off} {CHUNK}" for off, pattern in durable]
        for i in range(0, len(cmds), 200):
            qemu.io(img, *cmds[i:i + 200])
