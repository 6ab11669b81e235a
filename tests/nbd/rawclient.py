"""A deliberately dumb NBD client for protocol tests: it sends exactly the bytes a test asks for."""
from __future__ import annotations

import socket
import struct

from qcowpy.block import nbdproto as P


class RawClient:
    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.structured = False

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return buf

    def closed(self) -> bool:
        """True when the server has hung up (reads EOF or the connection resets)."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, socket.timeout):
            return True

    # ------------------------------------------------------------------ handshake
    def greet(self, flags: int = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES) -> None:
        magic, opt, hflags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT) and hflags & P.FLAG_FIXED_NEWSTYLE
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPTION.pack(P.IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, n = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
        assert magic == P.REPLY_MAGIC_OPT
        return opt, rtype, self.recv(n)

    def replies_until_final(self) -> list[tuple[int, bytes]]:
        out = []
        while True:
            _, rtype, data = self.option_reply()
            out.append((rtype, data))
            if rtype in (P.REP_ACK,) or rtype & P.REP_ERR:
                return out

    def go(self, name: str = "", structured: bool = True, contexts: tuple[str, ...] = ()) -> dict[int, str]:
        self.greet()
        ids = {}
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY)
            assert self.option_reply()[1] == P.REP_ACK
            self.structured = True
        if contexts:
            self.option(P.OPT_SET_META_CONTEXT, name_and_queries(name, contexts))
            for rtype, data in self.replies_until_final():
                if rtype == P.REP_META_CONTEXT:
                    ids[struct.unpack(">I", data[:4])[0]] = data[4:].decode()
        self.option(P.OPT_GO, struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0))
        assert self.replies_until_final()[-1][0] == P.REP_ACK
        return ids

    # ------------------------------------------------------------------ transmission
    def request(self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 1,
                data: bytes = b"") -> None:
        self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data)

    def reply(self, read_len: int = 0) -> tuple[int, int, list[tuple[int, bytes]]]:
        """(handle, error, chunks): a simple reply as one chunk of type -1, else all structured chunks."""
        (magic,) = struct.unpack(">I", self.recv(4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", self.recv(12))
            return handle, err, [(-1, self.recv(read_len) if not err else b"")]
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        chunks, error = [], 0
        while True:
            flags, rtype, handle, n = struct.unpack(">HHQI", self.recv(16))
            body = self.recv(n)
            if rtype & 0x8000:
                error = struct.unpack(">I", body[:4])[0]
            chunks.append((rtype, body))
            if flags & P.REPLY_FLAG_DONE:
                return handle, error, chunks
            (magic,) = struct.unpack(">I", self.recv(4))
            assert magic == P.STRUCTURED_REPLY_MAGIC


def name_and_queries(name: str, queries: tuple[str, ...]) -> bytes:
    body = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q.encode()
    return body
