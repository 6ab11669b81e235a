"""The vhost-user-blk back-end: one listening unix socket, one front-end at a time.

A single thread serves the connection: vhost-user messages on the socket and eventfd kicks of
every queue, each kick draining its queue through :class:`qcowpy.virtio.blk.VirtioBlk` under the
block node's lock (other exports of the node share it) and signalling the call eventfd when the
driver wants an interrupt. Queues are also polled every ``POLL`` seconds, so a notification
lost to a memory-ordering race costs latency, never a hang.

A front-end that breaks the protocol, or stalls inside a message for MESSAGE_TIMEOUT, is
disconnected; a guest that breaks the virtqueue rules
(descriptors outside the memory table, loops, bad indices) stops only that queue until the
front-end sets it up again. Neither can crash the daemon. When the front-end goes away the
back-end forgets its state and accepts the next connection (QEMU's ``reconnect``).
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
import struct
import threading
from typing import Any, Optional

from qcowpy.virtio.blk import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VirtioBlk
from qcowpy.virtio.split import GuestMemoryError, SplitVirtQueue, VirtQueueError

from . import protocol as P
from .memory import MemoryTable

log = logging.getLogger(__name__)

POLL = 0.5
MESSAGE_TIMEOUT = 5.0  # a message started must arrive whole within this, or the front-end is dropped
MAX_QUEUE_SIZE = 1024
PROTOCOL_FEATURES = (1 << P.PROTOCOL_F_MQ) | (1 << P.PROTOCOL_F_REPLY_ACK) | (1 << P.PROTOCOL_F_CONFIG)


class _Queue:
    """One virtqueue as the front-end configured it (addresses are front-end virtual)."""

    def __init__(self, mem: MemoryTable) -> None:
        self.vq = SplitVirtQueue(mem, MAX_QUEUE_SIZE)
        self.addrs: Optional[tuple[int, int, int]] = None
        self.base = 0  # the next available index (SET_VRING_BASE / GET_VRING_BASE)
        self.kick: Optional[int] = None
        self.call: Optional[int] = None
        self.enabled = False
        self.started = False

    def close_fds(self) -> None:
        for fd in (self.kick, self.call):
            if fd is not None:
                os.close(fd)
        self.kick = self.call = None


class _Connection:
    """The state of one front-end session."""

    def __init__(self, server: "VhostUserBlkServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.features = 0
        self.protocol_features = 0
        self.mem = MemoryTable()
        self.queues = [_Queue(self.mem) for _ in range(server.num_queues)]
        self.sel = selectors.DefaultSelector()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        self.sel.register(self.sock, selectors.EVENT_READ, None)
        self.sel.register(self.server._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.server._stopping.is_set():
                events = self.sel.select(POLL)
                if not events:
                    self._serve_all()
                for key, _ in events:
                    if key.data is None:
                        self._message()
                    elif isinstance(key.data, int):
                        try:
                            os.read(key.fd, 8)
                        except BlockingIOError:
                            pass
                        self._serve(key.data)
        except EOFError:
            log.info("vhost-user front-end disconnected")
        except (P.ProtocolError, OSError, struct.error) as e:
            log.warning("vhost-user front-end dropped: %s", e)
        finally:
            self.close()

    def close(self) -> None:
        for q in self.queues:
            self._unwatch(q)
            q.close_fds()
        self.mem.close()
        self.sel.close()
        self.sock.close()

    def _serve_all(self) -> None:
        for i, q in enumerate(self.queues):
            if q.started:
                self._serve(i)

    def _serve(self, index: int) -> None:
        q = self.queues[index]
        if not q.started or not (q.enabled or not self._has_protocol_features()):
            return
        try:
            self.mem.check()  # SIGBUS guard for files that could not be sealed against shrinking
        except GuestMemoryError as e:
            raise P.ProtocolError(str(e)) from None
        try:
            with self.server.lock:
                notify = self.server.blk.process_queue(q.vq)
        except VirtQueueError as e:
            log.warning("vhost-user-blk queue %d stopped: %s", index, e)
            q.started = False
            return
        if notify and q.call is not None:
            try:
                os.write(q.call, (1).to_bytes(8, "little"))
            except BlockingIOError:
                pass

    # -- messages -------------------------------------------------------------------------------
    def _has_protocol_features(self) -> bool:
        return bool(self.features & (1 << P.F_PROTOCOL_FEATURES))

    def _message(self) -> None:
        msg = P.recv_message(self.sock)
        try:
            reply = self._dispatch(msg)
            ok = True
        except (P.ProtocolError, VirtQueueError) as e:
            if not msg.flags & P.FLAG_NEED_REPLY or not self.protocol_features & (1 << P.PROTOCOL_F_REPLY_ACK):
                raise P.ProtocolError(str(e)) from None
            log.warning("vhost-user request %d failed: %s", msg.request, e)
            reply, ok = None, False
        finally:
            msg.close_fds()  # any descriptor the handler did not take
        if reply is not None:
            P.send_reply(self.sock, msg.request, reply)
        elif msg.flags & P.FLAG_NEED_REPLY and self.protocol_features & (1 << P.PROTOCOL_F_REPLY_ACK):
            P.send_reply(self.sock, msg.request, P.U64.pack(0 if ok else 1))

    def _queue(self, index: int) -> _Queue:
        if index >= len(self.queues):
            raise P.ProtocolError(f"vring index {index} out of range ({len(self.queues)} queues)")
        return self.queues[index]

    def _dispatch(self, msg: P.Message) -> Optional[bytes]:
        r = msg.request
        blk = self.server.blk
        if r == P.GET_FEATURES:
            return P.U64.pack(blk.host_features() | (1 << P.F_PROTOCOL_FEATURES))
        if r == P.SET_FEATURES:
            (self.features,) = msg.unpack(P.U64)
            for q in self.queues:
                q.vq.indirect = bool(self.features & (1 << VIRTIO_F_RING_INDIRECT_DESC))
                q.vq.event_idx = bool(self.features & (1 << VIRTIO_F_RING_EVENT_IDX))
            return None
        if r == P.GET_PROTOCOL_FEATURES:
            return P.U64.pack(PROTOCOL_FEATURES)
        if r == P.SET_PROTOCOL_FEATURES:
            (self.protocol_features,) = msg.unpack(P.U64)
            self.protocol_features &= PROTOCOL_FEATURES
            return None
        if r == P.GET_QUEUE_NUM:
            return P.U64.pack(len(self.queues))
        if r in (P.SET_OWNER, P.SET_VRING_ENDIAN, P.SET_CONFIG):
            return None
        if r == P.RESET_OWNER:
            self._reset()
            return None
        if r == P.SET_MEM_TABLE:
            table = MemoryTable(msg.payload, msg.fds)
            self._reset_queues_memory(table)
            return None
        if r == P.GET_CONFIG:
            offset, size, _flags = msg.unpack(P.CONFIG_HDR)
            if size > P.MAX_CONFIG_SIZE or offset > P.MAX_CONFIG_SIZE:
                raise P.ProtocolError(f"config space request {offset}+{size} is too large")
            cfg = blk.config()[offset:offset + size]
            return P.CONFIG_HDR.pack(offset, size, _flags) + cfg + bytes(size - len(cfg))
        if r in (P.SET_VRING_NUM, P.SET_VRING_BASE, P.SET_VRING_ENABLE, P.GET_VRING_BASE):
            index, num = msg.unpack(P.STATE)
            q = self._queue(index)
            if r == P.SET_VRING_NUM:
                if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
                    raise P.ProtocolError(f"invalid vring size {num}")
                q.vq.num = num
            elif r == P.SET_VRING_BASE:
                q.base = num & 0xFFFF
            elif r == P.SET_VRING_ENABLE:
                q.enabled = bool(num)
                self._serve(index)
            else:  # GET_VRING_BASE stops the ring (everything is served synchronously: no in-flight)
                if q.vq.ready:
                    q.base = q.vq.last_avail_idx
                q.started = False
                q.vq.ready = False
                self._unwatch(q)
                q.close_fds()
                return P.STATE.pack(index, q.base)
            return None
        if r == P.SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = msg.unpack(P.ADDR)
            self._queue(index).addrs = (desc, avail, used)
            return None
        if r in (P.SET_VRING_KICK, P.SET_VRING_CALL, P.SET_VRING_ERR):
            (u,) = msg.unpack(P.U64)
            q = self._queue(u & P.VRING_IDX_MASK)
            fd = None if u & P.VRING_NOFD_MASK else msg.take_fd()
            if r == P.SET_VRING_ERR:
                if fd is not None:
                    os.close(fd)
            elif r == P.SET_VRING_CALL:
                if q.call is not None:
                    os.close(q.call)
                q.call = fd
            else:
                self._unwatch(q)
                if q.kick is not None:
                    os.close(q.kick)
                q.kick = fd
                self._start(u & P.VRING_IDX_MASK)
            return None
        if r in (P.SET_SLAVE_REQ_FD, P.SET_LOG_FD):
            return None  # the descriptor is closed with the message
        raise P.ProtocolError(f"unsupported vhost-user request {r}")

    # -- queue life cycle -----------------------------------------------------------------------
    def _start(self, index: int) -> None:
        """The ring starts on its kick descriptor (libvhost-user's rule too)."""
        q = self.queues[index]
        if q.addrs is None:
            raise P.ProtocolError(f"vring {index} kicked before its addresses were set")
        desc, avail, used = (self.mem.to_guest(a) for a in q.addrs)
        try:
            self.mem.check()  # attaching reads the rings
        except GuestMemoryError as e:
            raise P.ProtocolError(str(e)) from None
        q.vq.attach(desc, avail, used, q.base)  # a ring outside memory is the front-end's error
        q.started = True
        if q.kick is not None:
            os.set_blocking(q.kick, False)
            self.sel.register(q.kick, selectors.EVENT_READ, index)
        self._serve(index)

    def _unwatch(self, q: _Queue) -> None:
        if q.kick is not None:
            try:
                self.sel.unregister(q.kick)
            except (KeyError, ValueError):
                pass

    def _reset_queues_memory(self, table: MemoryTable) -> None:
        old = self.mem
        self.mem = table
        for q in self.queues:
            q.vq.set_memory(table)
        old.close()

    def _reset(self) -> None:
        for q in self.queues:
            self._unwatch(q)
            q.close_fds()
        self.queues = [_Queue(self.mem) for _ in range(len(self.queues))]
        self.features = self.protocol_features = 0


class VhostUserBlkServer:
    """A vhost-user-blk export of one BlockDevice on a unix socket."""

    def __init__(self, path: str, blk: Any, lock: threading.Lock, writable: bool = False,
                 num_queues: int = 1, logical_block_size: int = 512, serial: str = "") -> None:
        self.path = path
        self.lock = lock
        self.num_queues = num_queues
        self.blk = VirtioBlk(blk, read_only=not writable, serial=serial, queue_size=MAX_QUEUE_SIZE,
                             logical_block_size=logical_block_size, num_queues=num_queues)
        self.blk.seg_max = 128 - 2  # QEMU's vhost-user-blk queue-size default is 128
        if os.path.exists(path) and not os.path.isdir(path):
            os.unlink(path)
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listen.bind(path)
        self._listen.listen(1)
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = threading.Event()
        self.connected = False
        self._conn: Optional[socket.socket] = None
        self._thread = threading.Thread(target=self._serve, name=f"vhost-user-blk {path}", daemon=True)

    def start(self) -> "VhostUserBlkServer":
        self._thread.start()
        return self

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listen, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                if not sel.select(None) or self._stopping.is_set():
                    continue
                try:
                    conn, _ = self._listen.accept()
                except OSError:
                    continue
                self.connected = True
                conn.settimeout(MESSAGE_TIMEOUT)
                self._conn = conn
                try:
                    _Connection(self, conn).run()
                except Exception:  # never let one front-end take the export down
                    log.exception("vhost-user-blk connection failed")
                finally:
                    self.connected = False
                    self._conn = None
        finally:
            sel.close()

    def close(self) -> None:
        """Disconnect the front-end, stop serving and remove the socket."""
        self._stopping.set()
        os.write(self._wake_w, b"x")
        conn = self._conn
        if conn is not None:  # wakes a thread blocked inside a message
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join()
        self._listen.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
