"""A minimal vhost-user front-end for tests: guest memory in a memfd, split rings laid out in it,
and virtio-blk requests put on them by hand, so a test can also break every rule on purpose."""
from __future__ import annotations

import mmap
import os
import select
import socket
import struct

from qcowpy.export.vhost_user import protocol as P

UADDR = 0x7F0000000000  # the front-end "virtual" address of guest physical 0
MEM = 4 << 20
QSIZE = 16
F_INDIRECT, F_EVENT_IDX, F_VERSION_1 = 28, 29, 32


class FrontEnd:
    def __init__(self, path: str, num_queues: int = 1, features: int | None = None, sealable: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.sock.settimeout(10)
        self.fd = os.memfd_create("guest", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
        os.ftruncate(self.fd, MEM)
        self.mem = mmap.mmap(self.fd, MEM)
        self.num_queues = num_queues
        self.kicks = [os.eventfd(0) for _ in range(num_queues)]
        self.calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(num_queues)]
        self.avail_idx = [0] * num_queues
        self.next_buf = 0x100000
        self.features = features

    # -- messages ---------------------------------------------------------------------------------
    def send(self, req: int, payload: bytes = b"", fds: list[int] = (), need_reply: bool = False) -> None:
        flags = P.VERSION | (P.FLAG_NEED_REPLY if need_reply else 0)
        data = P.HEADER.pack(req, flags, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def recv(self) -> tuple[int, bytes]:
        hdr = self.sock.recv(P.HEADER.size, socket.MSG_WAITALL)
        if len(hdr) < P.HEADER.size:
            raise EOFError
        req, _flags, size = P.HEADER.unpack(hdr)
        return req, self.sock.recv(size, socket.MSG_WAITALL) if size else b""

    def get_u64(self, req: int) -> int:
        self.send(req)
        return P.U64.unpack(self.recv()[1])[0]

    def closed(self, timeout: float = 10) -> bool:
        """True once the back-end has dropped the connection (waiting up to ``timeout``)."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    # -- set-up -----------------------------------------------------------------------------------
    def ring(self, q: int) -> tuple[int, int, int]:
        base = 0x10000 * (q + 1)
        return base, base + 0x1000, base + 0x2000  # desc, avail, used (guest physical)

    def setup(self, region_size: int = MEM) -> None:
        offered = self.get_u64(P.GET_FEATURES)
        want = offered if self.features is None else offered & self.features
        self.send(P.SET_FEATURES, P.U64.pack(want))
        self.negotiated = want
        proto = self.get_u64(P.GET_PROTOCOL_FEATURES)
        self.send(P.SET_PROTOCOL_FEATURES, P.U64.pack(proto))
        self.send(P.SET_OWNER)
        self.send(P.SET_MEM_TABLE, struct.pack("<II", 1, 0) + P.REGION.pack(0, region_size, UADDR, 0), [self.fd])
        for q in range(self.num_queues):
            desc, avail, used = self.ring(q)
            self.send(P.SET_VRING_NUM, P.STATE.pack(q, QSIZE))
            self.send(P.SET_VRING_BASE, P.STATE.pack(q, 0))
            self.send(P.SET_VRING_ADDR, P.ADDR.pack(q, 0, UADDR + desc, UADDR + used, UADDR + avail, 0))
            self.send(P.SET_VRING_CALL, P.U64.pack(q), [self.calls[q]])
            self.send(P.SET_VRING_KICK, P.U64.pack(q), [self.kicks[q]])
            self.send(P.SET_VRING_ENABLE, P.STATE.pack(q, 1))

    def config(self) -> bytes:
        self.send(P.GET_CONFIG, P.CONFIG_HDR.pack(0, 60, 0) + bytes(60))
        return self.recv()[1][P.CONFIG_HDR.size:]

    # -- requests ---------------------------------------------------------------------------------
    def buf(self, data: bytes | int) -> tuple[int, int]:
        n = data if isinstance(data, int) else len(data)
        addr = self.next_buf
        self.next_buf += (n + 4095) & ~4095
        if self.next_buf > MEM:
            self.next_buf = 0x100000
            return self.buf(data)
        if not isinstance(data, int):
            self.mem[addr:addr + n] = data
        return addr, n

    def chain(self, q: int, bufs: list[tuple[int, int, bool]], head: int = 0, indirect: bool = False,
              raw: list[tuple[int, int, int, int]] | None = None) -> None:
        """Publish a chain: ``bufs`` of (addr, len, device-writable), or ``raw`` descriptors."""
        desc, avail, _ = self.ring(q)
        descs = raw or [(a, n, (2 if w else 0) | (1 if i + 1 < len(bufs) else 0), i + 1)
                        for i, (a, n, w) in enumerate(bufs)]
        if indirect:
            table, _ = self.buf(b"".join(struct.pack("<QIHH", *d) for d in descs))
            struct.pack_into("<QIHH", self.mem, desc + 16 * head, table, 16 * len(descs), 4, 0)
        else:
            for i, d in enumerate(descs):
                struct.pack_into("<QIHH", self.mem, desc + 16 * ((head + i) % QSIZE), *d[:3],
                                 (head + d[3]) % QSIZE if raw is None else d[3])
        idx = self.avail_idx[q]
        struct.pack_into("<H", self.mem, avail + 4 + 2 * QSIZE, self.used_idx(q))  # used_event: interrupt me next
        struct.pack_into("<H", self.mem, avail + 4 + 2 * (idx % QSIZE), head)
        self.avail_idx[q] = (idx + 1) & 0xFFFF
        struct.pack_into("<H", self.mem, avail + 2, self.avail_idx[q])
        os.eventfd_write(self.kicks[q], 1)

    def used_idx(self, q: int) -> int:
        return struct.unpack_from("<H", self.mem, self.ring(q)[2] + 2)[0]

    def wait_used(self, q: int, idx: int, timeout: float = 10) -> bool:
        """Wait (on the call eventfd) until the used index reaches ``idx``."""
        while self.used_idx(q) != idx:
            if not select.select([self.calls[q]], [], [], timeout)[0]:
                return False
            os.eventfd_read(self.calls[q])
        return True

    def request(self, q: int, rtype: int, sector: int, data: bytes = b"", read: int = 0,
                indirect: bool = False, pieces: int = 1) -> tuple[int, bytes]:
        """One virtio-blk request, its read buffer cut in ``pieces``; (status, bytes read)."""
        hdr = self.buf(struct.pack("<IIQ", rtype, 0, sector) + data)
        bufs = [(hdr[0], hdr[1], False)]
        rds = [self.buf(read // pieces) for _ in range(pieces)] if read else []
        bufs += [(a, n, True) for a, n in rds]
        st = self.buf(b"\xff")
        bufs.append((st[0], 1, True))
        before = self.used_idx(q)
        self.chain(q, bufs, head=self.avail_idx[q] * 4 % QSIZE, indirect=indirect)
        assert self.wait_used(q, (before + 1) & 0xFFFF), "request not completed"
        return self.mem[st[0]], b"".join(bytes(self.mem[a:a + n]) for a, n in rds)

    def close(self) -> None:
        self.sock.close()
        for fd in self.kicks + self.calls + [self.fd]:
            os.close(fd)
        self.mem.close()
