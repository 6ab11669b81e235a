"""The transmission phase of one connection: a reader thread decodes requests, a shared worker pool
runs them on the device, and a writer thread sends replies in completion order (out of order, as NBD
allows). Workers never touch the socket, so a client that stops reading stalls only itself.

Memory is bounded per connection: a request holds its share of the budget from decoding until its
last reply is sent, and the reader takes no more while ``MAX_INFLIGHT`` requests or
``MAX_INFLIGHT_BYTES`` of payload are outstanding, so a client that pipelines without reading
replies only fills its own socket buffers.
"""
from __future__ import annotations

import logging
import queue
import ssl
import threading
from concurrent.futures import Executor

from ...block.device import status_at
from ...block.open import probe_bytes
from ...errors import InvalidArgument, ReadOnlyError
from ...kernels import is_zero
from ...block import nbdproto as P
from .handshake import Session
from ...block.nbdwire import Disconnected, Sender, recv_into_exact

log = logging.getLogger("qcowpy.nbd")

MAX_INFLIGHT = 64
MAX_INFLIGHT_BYTES = 64 << 20
INLINE_MAX = 256 << 10  # reads and plain writes up to this size run on the reader thread: no hand-off
SPARSE_READ = 64 << 10  # smaller reads skip block status and come back as one data chunk

UNBUDGETED = -1  # the cost of a request answered inline, before the next one is read (holds no budget)

_VALID_FLAGS = {P.CMD_WRITE_ZEROES: P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO, P.CMD_BLOCK_STATUS: P.CMD_FLAG_REQ_ONE}
_WRITES = (P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_TRIM)


class RequestError(Exception):
    """A request fails with an NBD error number (the connection goes on)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Budget:
    """Counts a connection's outstanding requests and payload bytes; ``take`` waits for room."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.count = 0
        self.bytes = 0

    def take(self, cost: int) -> None:
        with self.cond:
            while self.count and (self.count >= MAX_INFLIGHT or self.bytes + cost > MAX_INFLIGHT_BYTES):
                self.cond.wait()
            self.count += 1
            self.bytes += cost

    def give(self, cost: int) -> None:
        with self.cond:
            self.count -= 1
            self.bytes -= cost
            self.cond.notify_all()

    def wait_idle(self) -> None:
        with self.cond:
            while self.count:
                self.cond.wait()


class Connection:
    """Serves one negotiated client until it sends DISC, breaks the protocol, or the server stops."""

    def __init__(self, session: Session, pool: Executor):
        self.s = session
        self.exp = session.export
        self.dev = session.export.device
        self.pool = pool
        self.out = Sender(session.sock)
        self.budget = Budget()
        self._header = memoryview(bytearray(P.REQUEST.size))  # every request header lands here
        self.replies: queue.SimpleQueue = queue.SimpleQueue()
        self.broken = False
        # An OpenSSL connection must not be read and written by two threads at once: over TLS every
        # request runs on the reader thread (in order), which is then the only thread on the socket.
        self.serial = isinstance(session.sock, ssl.SSLSocket)

    def serve(self) -> None:
        self.reader = threading.get_ident()
        writer = threading.Thread(target=self._writer, name="nbd-reply", daemon=True)
        writer.start()
        try:
            while self._next():
                pass
        except Disconnected:
            pass
        finally:
            self.budget.wait_idle()
            self.replies.put(None)
            writer.join()

    def _writer(self) -> None:
        while (item := self.replies.get()) is not None:
            self._send(*item)

    def _reply(self, parts: tuple, cost: int | None) -> None:
        """Send one reply record: queued for the writer from workers, directly from the reader (which
        may then wait on a slow client: that stalls only this connection). ``cost`` (not None) marks
        the request's last record and frees its budget."""
        if threading.get_ident() != self.reader:
            self.replies.put((parts, cost))
        else:
            self._send(parts, cost)

    def _send(self, parts: tuple, cost: int | None) -> None:
        """Put one reply record on the wire (unless the client is gone) and free its budget."""
        if not self.broken:
            try:
                self.out.send(*parts)
            except Disconnected:
                self.broken = True
        if cost is not None and cost >= 0:
            self.budget.give(cost)

    # ------------------------------------------------------------------------------ reader
    def _next(self) -> bool:
        recv_into_exact(self.s.sock, self._header)
        magic, flags, cmd, handle, offset, length = P.REQUEST.unpack(self._header)
        if magic != P.REQUEST_MAGIC:
            log.info("bad request magic 0x%08x: disconnecting", magic)
            return False
        if cmd == P.CMD_DISC:
            return False
        if cmd == P.CMD_READ and length <= INLINE_MAX:
            # answered right here before the next request is read: it needs no share of the budget
            try:
                self._validate(flags, cmd, offset, length)
            except RequestError as e:
                self._send_error(handle, e.code, str(e), UNBUDGETED)
                return True
            self._run(flags, cmd, handle, offset, length, None, UNBUDGETED)
            return not self.broken
        big = cmd in (P.CMD_READ, P.CMD_WRITE, P.CMD_CACHE) and length > P.MAX_BUFFER
        cost = length if cmd in (P.CMD_READ, P.CMD_WRITE) and not big else 0
        self.budget.take(cost)
        if big:
            self._send_error(handle, P.EINVAL, f"len ({length}) is larger than max len ({P.MAX_BUFFER})", cost)
            return cmd != P.CMD_WRITE  # the payload cannot be skipped safely: hang up, as qemu-nbd does
        payload = None
        if cmd == P.CMD_WRITE:
            payload = memoryview(bytearray(length))
            try:
                recv_into_exact(self.s.sock, payload)
            except Disconnected:
                self.budget.give(cost)
                raise
        try:
            self._validate(flags, cmd, offset, length)
        except RequestError as e:
            self._send_error(handle, e.code, str(e), cost)
            return True
        if self.serial or self._inline(flags, cmd, length):
            self._run(flags, cmd, handle, offset, length, payload, cost)
        else:
            self.pool.submit(self._run, flags, cmd, handle, offset, length, payload, cost)
        return not self.broken

    def _inline(self, flags: int, cmd: int, length: int) -> bool:
        """Small reads and plain writes: cheaper to run here than to hand to the pool and back."""
        if length > INLINE_MAX:
            return False
        return cmd == P.CMD_READ or (cmd == P.CMD_WRITE and not flags & P.CMD_FLAG_FUA and not self.exp.writethrough)

    def _validate(self, flags: int, cmd: int, offset: int, length: int) -> None:
        if cmd not in P.COMMAND_NAMES:
            raise RequestError(P.EINVAL, f"unsupported command {cmd}")
        if self.exp.read_only and cmd in _WRITES:
            raise RequestError(P.EPERM, "Export is read-only")
        if offset > self.exp.size or length > self.exp.size - offset:
            code = P.ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            raise RequestError(code, f"operation past EOF; From: {offset}, Len: {length}, Size: {self.exp.size}")
        valid = P.CMD_FLAG_FUA | _VALID_FLAGS.get(cmd, 0)
        if cmd == P.CMD_READ and self.s.structured:
            valid |= P.CMD_FLAG_DF
        if flags & ~valid:
            raise RequestError(P.EINVAL, f"unsupported flags for command {P.COMMAND_NAMES[cmd]} (got 0x{flags:x})")
        if cmd == P.CMD_BLOCK_STATUS and (not self.s.structured or not self.s.contexts or not length):
            raise RequestError(P.EINVAL, "need non-zero length and a negotiated metadata context")

    # ------------------------------------------------------------------------------ workers
    def _run(self, flags: int, cmd: int, handle: int, offset: int, length: int, payload, cost: int) -> None:
        try:
            if cmd == P.CMD_READ:
                self._read(flags, handle, offset, length, cost)
            elif cmd == P.CMD_BLOCK_STATUS:
                self._block_status(flags, handle, offset, length, cost)
            else:
                self._modify(flags, cmd, offset, length, payload)
                self._reply((P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle),), cost)
        except RequestError as e:
            self._send_error(handle, e.code, str(e), cost)
        except Exception as e:  # the device failed: the client gets an error, the server goes on
            code, text = _device_error(e)
            log.warning("%s failed: %s", P.COMMAND_NAMES.get(cmd, cmd), text)
            self._send_error(handle, code, text, cost)

    def _modify(self, flags: int, cmd: int, offset: int, length: int, payload) -> None:
        dev, exp = self.dev, self.exp
        if cmd == P.CMD_WRITE:
            if exp.guard_block0 and offset < 512:
                self._check_block0(offset, payload)
            if exp.detect_zeroes != "off" and length and is_zero(payload):
                dev.write_zeroes(length, offset, unmap=exp.detect_zeroes == "unmap" and exp.discard)
            else:
                dev.pwrite(payload, offset)
        elif cmd == P.CMD_WRITE_ZEROES:
            unmap = exp.discard and not flags & P.CMD_FLAG_NO_HOLE
            if flags & P.CMD_FLAG_FAST_ZERO and not self._zeroes_fast(offset, length, unmap):
                raise RequestError(P.ENOTSUP, "fast zeroing is not possible here")
            dev.write_zeroes(length, offset, unmap=unmap)
        elif cmd == P.CMD_TRIM:
            if exp.discard:
                dev.discard(length, offset)
        elif cmd == P.CMD_FLUSH:
            dev.flush()
            return
        elif cmd == P.CMD_CACHE:
            return  # advisory: every read goes to the device anyway
        if flags & P.CMD_FLAG_FUA or exp.writethrough:
            dev.flush()

    def _check_block0(self, offset: int, payload) -> None:
        head = bytearray(self.dev.pread(min(512, self.exp.size), 0))
        n = min(len(payload), len(head) - offset)
        head[offset:offset + n] = payload[:n]
        fmt = probe_bytes(bytes(head))
        if fmt == "qcow2" and not int.from_bytes(head[4:8], "big"):
            fmt = "raw"  # QEMU's qcow and qcow2 probes also want a version after the magic
        if fmt != "raw":
            raise RequestError(P.EPERM, "the write would make this probed raw image look like another format")

    def _zeroes_fast(self, offset: int, length: int, unmap: bool) -> bool:
        """FAST_ZERO promises no slower than writing zeros: qcow2 zeroes by metadata, raw by punching."""
        if self.dev.format == "qcow2":
            return True
        return unmap

    def _read(self, flags: int, handle: int, offset: int, length: int, cost: int) -> None:
        if not self.s.structured:
            buf = bytearray(length)
            self.dev.preadinto(buf, offset)
            self._reply((P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, 0, handle), buf), cost)
            return
        if flags & P.CMD_FLAG_DF or length < SPARSE_READ:
            runs = [(offset, length, False)]
        else:
            runs = [(e.start, e.length, e.zero) for e in _extents(self.dev, offset, length)]
        chunks = []  # sent only once the whole read succeeded: an error replaces them all
        for start, n, zero in runs:
            if zero:
                chunks.append((P.REPLY_TYPE_OFFSET_HOLE, P.HOLE.pack(start, n)))
            else:
                buf = bytearray(8 + n)
                buf[:8] = P.OFFSET.pack(start)
                self.dev.preadinto(memoryview(buf)[8:], start)
                chunks.append((P.REPLY_TYPE_OFFSET_DATA, buf))
        for i, (kind, body) in enumerate(chunks):
            last = i == len(chunks) - 1
            header = P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE if last else 0, kind, handle, len(body))
            self._reply((header, body), cost if last else None)

    def _block_status(self, flags: int, handle: int, offset: int, length: int, cost: int) -> None:
        names = list(self.s.contexts.items())
        status = self.exp.status(offset, length, [n for _, n in names], bool(flags & P.CMD_FLAG_REQ_ONE))
        for i, (cid, name) in enumerate(names):
            body = cid.to_bytes(4, "big") + b"".join(P.EXTENT.pack(n, v) for n, v in status[name])
            last = i == len(names) - 1
            header = P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE if last else 0,
                                  P.REPLY_TYPE_BLOCK_STATUS, handle, len(body))
            self._reply((header, body), cost if last else None)

    def _send_error(self, handle: int, code: int, message: str, cost: int) -> None:
        if self.s.structured:
            text = message.encode()[:P.MAX_STRING]
            body = P.ERROR.pack(code, len(text)) + text
            self._reply((P.CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, handle,
                                      len(body)), body), cost)
        else:
            self._reply((P.SIMPLE_REPLY.pack(P.SIMPLE_REPLY_MAGIC, code, handle),), cost)


def _extents(dev, offset: int, length: int):
    """Runs of the read range as the block layer reports them (qemu-nbd splits its chunks the same way)."""
    pos, end = offset, offset + length
    while pos < end:
        e = status_at(dev, pos, end - pos)
        yield e
        pos += e.length


def _device_error(e: Exception) -> tuple[int, str]:
    if isinstance(e, ReadOnlyError):
        return P.EPERM, str(e)
    if isinstance(e, InvalidArgument):
        return P.EINVAL, str(e)
    if isinstance(e, OSError) and e.errno is not None:
        return P.error_to_wire(e.errno), e.strerror or str(e)
    return P.EIO, str(e) or type(e).__name__
