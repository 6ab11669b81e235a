"""``qemu-nbd -L``: ask a server which exports it offers (NBD_OPT_LIST, then NBD_OPT_INFO and
NBD_OPT_LIST_META_CONTEXT for each), as QEMU's nbd_receive_export_list does."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..errors import QcowError
from . import nbdproto as P
from .nbd import Address, NbdDevice
from .nbdwire import Disconnected, recv_exact

_FLAG_NAMES = {P.FLAG_READ_ONLY: "readonly", P.FLAG_SEND_FLUSH: "flush", P.FLAG_SEND_FUA: "fua",
               1 << 4: "rotational", P.FLAG_SEND_TRIM: "trim", P.FLAG_SEND_WRITE_ZEROES: "zeroes",
               P.FLAG_SEND_DF: "df", P.FLAG_CAN_MULTI_CONN: "multi", 1 << 9: "resize",
               P.FLAG_SEND_CACHE: "cache", P.FLAG_SEND_FAST_ZERO: "fast-zero"}


@dataclass
class ExportInfo:
    name: str
    description: str
    size: int = 0
    flags: int = 0
    min_block: int = 0
    opt_block: int = 0
    max_block: int = 0
    contexts: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """qemu-nbd -L's lines for this export."""
        out = [f" export: '{self.name}'"]
        if self.description:
            out.append(f"  description: {self.description}")
        if self.flags & P.FLAG_HAS_FLAGS:
            names = "".join(f" {n}" for bit, n in sorted(_FLAG_NAMES.items()) if self.flags & bit)
            out += [f"  size:  {self.size}", f"  flags: 0x{self.flags:x} ({names} )"]
        if self.min_block:
            out += [f"  min block: {self.min_block}", f"  opt block: {self.opt_block}",
                    f"  max block: {self.max_block}"]
        if self.contexts:
            out.append(f"  available meta contexts: {len(self.contexts)}")
            out += [f"   {c}" for c in self.contexts]
        return "\n".join(out) + "\n"


class _Lister(NbdDevice):
    """Only the connection and option machinery of the client: no export is opened."""

    def __init__(self, addr: Address, hostname: str | None) -> None:  # noqa: super().__init__ negotiates
        self.addr = addr
        self.filename = addr.canonical()
        self.sock = self._connect()
        self.hostname = hostname

    def list(self) -> list[ExportInfo]:
        magic, opt, hflags = struct.unpack(">QQH", recv_exact(self.sock, 18))
        if magic != P.NBDMAGIC or opt != P.IHAVEOPT or not hflags & P.FLAG_FIXED_NEWSTYLE:
            raise QcowError("Server does not support export lists")
        self.sock.sendall(struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | (hflags & P.FLAG_NO_ZEROES)))
        if self.addr.tls:
            self._starttls(self.hostname)
        structured = self._option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK
        found: list[ExportInfo] = []
        for rtype, data in self._option(P.OPT_LIST):
            if rtype == P.REP_SERVER and len(data) >= 4:
                (n,) = struct.unpack(">I", data[:4])
                found.append(ExportInfo(data[4:4 + n].decode("utf-8", "replace"),
                                        data[4 + n:].decode("utf-8", "replace")))
            elif rtype & P.REP_ERR:
                raise QcowError(f"Server does not support export lists: {data.decode('utf-8', 'replace')}")
        for info in found:
            name = info.name.encode()
            head = struct.pack(">I", len(name)) + name
            replies = self._option(P.OPT_INFO, head + struct.pack(">HH", 1, P.INFO_BLOCK_SIZE))
            if replies[-1][0] != P.REP_ACK:
                break
            for rtype, data in replies:
                kind = struct.unpack(">H", data[:2])[0] if rtype == P.REP_INFO and len(data) >= 2 else None
                if kind == P.INFO_EXPORT and len(data) == P.EXPORT_INFO.size:
                    _, info.size, info.flags = P.EXPORT_INFO.unpack(data)
                elif kind == P.INFO_BLOCK_SIZE and len(data) == P.BLOCK_SIZE_INFO.size:
                    _, info.min_block, info.opt_block, info.max_block = P.BLOCK_SIZE_INFO.unpack(data)
            if structured:
                for rtype, data in self._option(P.OPT_LIST_META_CONTEXT, head + struct.pack(">I", 0)):
                    if rtype == P.REP_META_CONTEXT:
                        info.contexts.append(data[4:].decode("utf-8", "replace"))
        try:
            self.sock.sendall(P.OPTION.pack(P.IHAVEOPT, P.OPT_ABORT, 0))  # a courtesy, as QEMU
        except OSError:
            pass
        return found


def list_exports(addr: Address, hostname: str | None = None) -> list[ExportInfo]:
    """The exports a server offers; QcowError with QEMU's words when it cannot say."""
    lister = _Lister(addr, hostname)
    try:
        return lister.list()
    except Disconnected as e:
        raise QcowError(f"Failed to read initial magic: {e}") from None
    finally:
        lister.sock.close()
