"""Server side of fixed newstyle negotiation: options until GO or EXPORT_NAME picks an export."""
from __future__ import annotations

import logging
import socket
import ssl
import struct
from typing import Callable
from dataclasses import dataclass, field

from ...block import nbdproto as P
from .authz import Authz
from .export import Export
from ...block.nbdwire import Disconnected, drain, recv_exact

log = logging.getLogger("qcowpy.nbd")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


class Refused(Exception):
    """Negotiation ended without an export (ABORT, a protocol violation, an unknown EXPORT_NAME)."""


@dataclass
class Session:
    """What negotiation settled for the transmission phase."""

    sock: socket.socket
    export: Export
    structured: bool
    contexts: dict[int, str] = field(default_factory=dict)  # id -> context name


class Negotiation:
    """One client's option haggling. ``tls`` set means options other than STARTTLS need TLS first."""

    def __init__(self, sock: socket.socket, exports: dict[str, Export], tls: ssl.SSLContext | None = None,
                 authz: Authz | None = None, claim: Callable[[Export], bool] | None = None):
        self.sock = sock
        self.claim = claim  # called before the export is granted: False when it was withdrawn meanwhile
        self.exports = exports
        self.tls = tls
        self.authz = authz
        self.structured = False
        self.no_zeroes = False
        self.meta: tuple[str, list[str]] | None = None  # (export name, contexts) chosen by SET_META_CONTEXT

    def run(self) -> Session:
        self.sock.sendall(struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (cflags,) = _U32.unpack(recv_exact(self.sock, 4))
        if cflags & ~(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES) or not cflags & P.FLAG_FIXED_NEWSTYLE:
            raise Refused(f"unsupported client flags 0x{cflags:x}")
        self.no_zeroes = bool(cflags & P.FLAG_NO_ZEROES)
        while True:
            magic, opt, length = P.OPTION.unpack(recv_exact(self.sock, P.OPTION.size))
            if magic != P.IHAVEOPT:
                raise Refused("bad option magic")
            if length > P.MAX_OPTION:
                if opt == P.OPT_EXPORT_NAME:
                    raise Refused("export name too long")
                drain(self.sock, length)
                self.error(opt, P.REP_ERR_TOO_BIG, "option too long")
                continue
            data = bytes(recv_exact(self.sock, length))
            if self.tls is not None and opt not in (P.OPT_STARTTLS, P.OPT_ABORT):
                if opt == P.OPT_EXPORT_NAME:
                    raise Refused("TLS required")
                self.error(opt, P.REP_ERR_TLS_REQD, "TLS negotiation required before option")
                continue
            session = self.option(opt, data)
            if session is not None:
                return session

    # ------------------------------------------------------------------------------ replies
    def reply(self, opt: int, rtype: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPTION_REPLY.pack(P.REPLY_MAGIC_OPT, opt, rtype, len(data)) + data)

    def error(self, opt: int, rtype: int, message: str) -> None:
        self.reply(opt, rtype, message.encode()[: P.MAX_STRING])

    # ------------------------------------------------------------------------------ options
    def option(self, opt: int, data: bytes) -> Session | None:
        if opt == P.OPT_EXPORT_NAME:
            return self.export_name(data)
        if opt == P.OPT_ABORT:
            try:
                self.reply(opt, P.REP_ACK)
            except OSError:
                pass
            raise Refused("client aborted")
        if opt in (P.OPT_INFO, P.OPT_GO):
            return self.info(opt, data)
        if opt == P.OPT_LIST:
            return self.list_exports(data)
        if opt == P.OPT_STARTTLS:
            return self.starttls(data)
        if opt == P.OPT_STRUCTURED_REPLY:
            if data:
                self.error(opt, P.REP_ERR_INVALID, "option length must be 0")
            elif self.structured:
                self.error(opt, P.REP_ERR_INVALID, "structured reply already negotiated")
            else:
                self.structured = True
                self.reply(opt, P.REP_ACK)
            return None
        if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            self.meta_context(opt, data)
            return None
        self.error(opt, P.REP_ERR_UNSUP, f"Unsupported option {opt}")
        return None

    def export_name(self, data: bytes) -> Session:
        exp = self.exports.get(data.decode("utf-8", "replace"))
        if exp is None or (self.claim is not None and not self.claim(exp)):
            raise Refused("unknown export")
        self.sock.sendall(struct.pack(">QH", exp.size, exp.flags) + (b"" if self.no_zeroes else bytes(124)))
        return self.session(exp)

    def session(self, exp: Export) -> Session:
        contexts: dict[int, str] = {}
        if self.meta is not None and self.meta[0] == exp.name:
            contexts = {exp.context_id(c): c for c in self.meta[1]}
        return Session(self.sock, exp, self.structured, contexts)

    def info(self, opt: int, data: bytes) -> Session | None:
        parsed = _parse_name(data)
        if parsed is None or len(parsed[1]) < 2:
            self.error(opt, P.REP_ERR_INVALID, "option length is invalid")
            return None
        name, rest = parsed
        (n,) = _U16.unpack(rest[:2])
        if len(rest) != 2 + 2 * n:
            self.error(opt, P.REP_ERR_INVALID, "option length is invalid")
            return None
        wanted = {_U16.unpack(rest[2 + 2 * i:4 + 2 * i])[0] for i in range(n)}
        exp = self.exports.get(name)
        if exp is None:
            self.error(opt, P.REP_ERR_UNKNOWN, f"export '{name[:80]}' not present")
            return None
        if P.INFO_NAME in wanted:
            self.reply(opt, P.REP_INFO, _U16.pack(P.INFO_NAME) + name.encode())
        if exp.description is not None:
            self.reply(opt, P.REP_INFO, _U16.pack(P.INFO_DESCRIPTION) + exp.description.encode())
        # a probed raw image is written sector-wise (QEMU's read-modify-write guard of block 0); the
        # minimum is announced only to clients that asked, or that only asked for information
        minimum = exp.min_block if opt == P.OPT_INFO or P.INFO_BLOCK_SIZE in wanted else 1
        self.reply(opt, P.REP_INFO, P.BLOCK_SIZE_INFO.pack(P.INFO_BLOCK_SIZE, minimum, max(4096, minimum),
                                                           P.MAX_BUFFER))
        flags = exp.flags | (P.FLAG_SEND_DF if self.structured else 0)
        self.reply(opt, P.REP_INFO, P.EXPORT_INFO.pack(P.INFO_EXPORT, exp.size, flags))
        if opt == P.OPT_GO and self.claim is not None and not self.claim(exp):
            self.error(opt, P.REP_ERR_UNKNOWN, f"export '{name[:80]}' not present")
            return None
        self.reply(opt, P.REP_ACK)
        if opt == P.OPT_GO:
            return self.session(exp)
        return None

    def list_exports(self, data: bytes) -> None:
        if data:
            self.error(P.OPT_LIST, P.REP_ERR_INVALID, "option length must be 0")
            return
        for exp in self.exports.values():
            name = exp.name.encode()
            self.reply(P.OPT_LIST, P.REP_SERVER, _U32.pack(len(name)) + name + (exp.description or "").encode())
        self.reply(P.OPT_LIST, P.REP_ACK)

    def starttls(self, data: bytes) -> None:
        if data:
            self.error(P.OPT_STARTTLS, P.REP_ERR_INVALID, "option length must be 0")
        elif self.tls is None:
            self.error(P.OPT_STARTTLS, P.REP_ERR_POLICY, "TLS not configured")
        else:
            self.reply(P.OPT_STARTTLS, P.REP_ACK)
            try:
                self.sock = self.tls.wrap_socket(self.sock, server_side=True)
            except (ssl.SSLError, OSError) as e:
                raise Disconnected(f"TLS handshake failed: {e}") from None
            self.tls = None
            denied = self.authz.deny(self.sock.getpeercert()) if self.authz is not None else None
            if denied:
                log.warning("option negotiation failed: %s", denied)
                raise Refused(denied)
            self.structured, self.meta = False, None  # nothing negotiated in the clear carries over

    def meta_context(self, opt: int, data: bytes) -> None:
        listing = opt == P.OPT_LIST_META_CONTEXT
        if not self.structured:
            self.error(opt, P.REP_ERR_INVALID, "request structured replies first")
            return
        parsed = _parse_name(data)
        queries = _parse_queries(parsed[1]) if parsed is not None else None
        if parsed is None or queries is None:
            self.error(opt, P.REP_ERR_INVALID, "option length is invalid")
            return
        exp = self.exports.get(parsed[0])
        if exp is None:
            self.error(opt, P.REP_ERR_UNKNOWN, f"export '{parsed[0][:80]}' not present")
            return
        chosen: list[str] = list(exp.contexts) if listing and not queries else []
        for q in queries:
            chosen += [c for c in exp.match_contexts(q, listing) if c not in chosen]
        for c in chosen:
            self.reply(opt, P.REP_META_CONTEXT, _U32.pack(0 if listing else exp.context_id(c)) + c.encode())
        self.reply(opt, P.REP_ACK)
        if not listing:
            self.meta = (exp.name, chosen)


def _parse_name(data: bytes) -> tuple[str, bytes] | None:
    """A length-prefixed export name and what follows it, or None when the lengths do not add up."""
    if len(data) < 4:
        return None
    (n,) = _U32.unpack(data[:4])
    if n > P.MAX_STRING or 4 + n > len(data):
        return None
    return data[4:4 + n].decode("utf-8", "replace"), data[4 + n:]


def _parse_queries(data: bytes) -> list[str] | None:
    if len(data) < 4:
        return None
    (count,) = _U32.unpack(data[:4])
    out, pos = [], 4
    for _ in range(count):
        if pos + 4 > len(data):
            return None
        (n,) = _U32.unpack(data[pos:pos + 4])
        if n > P.MAX_STRING or pos + 4 + n > len(data):
            return None
        out.append(data[pos + 4:pos + 4 + n].decode("utf-8", "replace"))
        pos += 4 + n
    return out if pos == len(data) else None
