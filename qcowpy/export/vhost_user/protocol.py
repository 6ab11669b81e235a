"""vhost-user wire format: a 12-byte header (request, flags, payload size), a payload, and file
descriptors in SCM_RIGHTS ancillary data.

Everything read from the socket is bounded: a payload larger than any message we understand, or
more descriptors than a memory table can carry, ends the connection with :class:`ProtocolError`
instead of costing memory.
"""
from __future__ import annotations

import array
import socket
import struct
from typing import Optional

from qcowpy.errors import QcowError

# front-end requests
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SET_SLAVE_REQ_FD = 21
SET_VRING_ENDIAN = 23
GET_CONFIG = 24
SET_CONFIG = 25

# header flags
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

# protocol feature bits
PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9
F_PROTOCOL_FEATURES = 30  # virtio feature bit that announces protocol features

VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF
MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
MAX_PAYLOAD = 8 + 32 * MAX_MEM_REGIONS + 256  # the largest message we accept (a memory table)

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")          # vring index, num
ADDR = struct.Struct("<IIQQQQ")       # index, flags, desc, used, avail, log (front-end addresses)
REGION = struct.Struct("<QQQQ")       # guest phys, size, front-end address, mmap offset
CONFIG_HDR = struct.Struct("<III")    # offset, size, flags


class ProtocolError(QcowError):
    """The front-end broke the protocol; the back-end drops the connection."""


class Message:
    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds

    def unpack(self, st: struct.Struct) -> tuple:
        if len(self.payload) < st.size:
            raise ProtocolError(f"request {self.request}: payload of {len(self.payload)} bytes, "
                                f"expected {st.size}")
        return st.unpack_from(self.payload)

    def take_fd(self) -> Optional[int]:
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        import os
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket) -> Message:
    """One request; EOFError when the front-end hung up."""
    fds = array.array("i")
    data, anc, _flags, _ = sock.recvmsg(HEADER.size, socket.CMSG_SPACE(MAX_MEM_REGIONS * fds.itemsize))
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    msg = Message(0, 0, b"", list(fds))
    try:
        if not data:
            raise EOFError
        if len(data) < HEADER.size:
            data += _recv_exact(sock, HEADER.size - len(data))
        msg.request, msg.flags, size = HEADER.unpack(data)
        if size > MAX_PAYLOAD:
            raise ProtocolError(f"request {msg.request}: payload of {size} bytes is too large")
        msg.payload = _recv_exact(sock, size) if size else b""
    except BaseException:
        msg.close_fds()
        raise
    return msg


def send_reply(sock: socket.socket, request: int, payload: bytes) -> None:
    sock.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)
