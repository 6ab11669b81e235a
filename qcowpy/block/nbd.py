"""The nbd:// protocol driver: an NBD export as a BlockDevice, so every command takes ``nbd://`` images.

URIs as QEMU takes them: ``nbd://host[:port]/export``, ``nbd+unix:///export?socket=PATH``, and the
legacy ``nbd:unix:PATH[:exportname=NAME]`` / ``nbd:HOST:PORT[:exportname=NAME]``. The export is raw
bytes; open.py probes it and stacks the qcow2 driver on top when it holds a qcow2 image.
"""
from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from ..errors import InvalidArgument, QcowError, ReadOnlyError, UnsupportedFeature
from . import nbdproto as P
from .device import BlockDevice, LayerStatus, ReadsInto
from .names import NBD_SCHEMES, is_nbd_uri  # noqa: F401  (is_nbd_uri: this module's API too)
from .nbdwire import Disconnected, Sender, recv_exact, recv_into_exact

SCHEMES = NBD_SCHEMES
_STATUS_MAX = 1 << 31  # one BLOCK_STATUS asks about at most 2 GiB


@dataclass(frozen=True)
class Address:
    """Where an export lives: a unix socket path, or a TCP host and port; and its name."""

    export: str
    socket_path: str | None = None
    host: str | None = None
    port: int = 10809
    tls: bool = False
    tls_dir: str | None = None  # ?tls-certificates=DIR (libnbd's spelling): ca-cert.pem [client-cert.pem client-key.pem]

    def canonical(self) -> str:
        """The URI as QEMU prints an nbd image's filename."""
        scheme = "nbds" if self.tls else "nbd"
        tail = f"/{self.export}" if self.export else ""
        if self.socket_path is not None:
            return f"{scheme}+unix://{tail}?socket={self.socket_path}"
        return f"{scheme}://{self.host}:{self.port}{tail}"


def parse_uri(uri: str) -> Address:
    if uri.startswith("nbd:") and not uri.startswith(("nbd://", "nbd+")):
        return _parse_legacy(uri)
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2] or "tcp"
    tls = parts.scheme.startswith("nbds")
    if transport not in ("tcp", "unix"):
        raise InvalidArgument(f"Invalid URI '{uri}': unknown transport '{transport}'")
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query)
    tls_dir = query.pop("tls-certificates", [None])[0]
    if tls_dir is not None and not tls:
        raise InvalidArgument(f"Invalid URI '{uri}': tls-certificates needs an nbds:// URI")
    if transport == "unix":
        if parts.netloc or "socket" not in query or len(query) > 1:
            raise InvalidArgument(f"Invalid URI '{uri}': nbd+unix needs ?socket=PATH and no host")
        return Address(export, socket_path=query["socket"][0], tls=tls, tls_dir=tls_dir)
    if query:
        raise InvalidArgument(f"Invalid URI '{uri}': unexpected query")
    try:
        port = parts.port or 10809
    except ValueError:
        raise InvalidArgument(f"Invalid URI '{uri}': bad port") from None
    return Address(export, host=parts.hostname or "localhost", port=port, tls=tls, tls_dir=tls_dir)


def _parse_legacy(uri: str) -> Address:
    body, _, export = uri[4:].partition(":exportname=")
    if body.startswith("unix:"):
        return Address(export, socket_path=body[5:])
    host, _, port = body.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"Invalid NBD address '{uri}'")
    return Address(export, host=host, port=int(port))


class NbdDevice(ReadsInto, BlockDevice):
    """A raw view of one export. Requests go one at a time (a lock), which is all the tools need."""

    format = "raw"
    has_image_info = False  # ``qemu-img info`` shows no dirty flag for an export
    holes_read_zero = False  # QEMU's nbd driver has no backing support: a hole stays a hole

    def __init__(self, uri: str, read_only: bool = True, meta_context: str | None = None):
        # meta_context: QEMU's x-dirty-bitmap: block status from that context (a dirty bitmap's
        # dirty ranges then read as holes), instead of base:allocation
        self.meta_context = meta_context or P.CONTEXT_BASE_ALLOCATION
        self.addr = parse_uri(uri)
        self.filename = self.display_name = self.addr.canonical()  # as QEMU names the image
        self.lock = threading.Lock()
        self.handle = 0
        self.sock = self._connect()
        try:
            self.structured = False
            self.meta_id: int | None = None
            self._size, self.flags, self.max_block = self._negotiate()
        except Disconnected as e:
            self.sock.close()
            raise QcowError(f"the server closed the connection ({e})") from None
        except BaseException:
            self.sock.close()
            raise
        self.read_only = read_only or bool(self.flags & P.FLAG_READ_ONLY)
        if not read_only and self.flags & P.FLAG_READ_ONLY:
            self.close()
            raise ReadOnlyError("Could not open image: Permission denied")
        self.out = Sender(self.sock)

    # ------------------------------------------------------------------ connection
    def _connect(self) -> socket.socket:
        a = self.addr
        try:
            if a.socket_path is not None:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(a.socket_path)
                except BaseException:
                    s.close()
                    raise
                return s
            s = socket.create_connection((a.host, a.port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError as e:
            where = a.socket_path or f"{a.host}:{a.port}"
            raise QcowError(f"Failed to connect to '{where}': "
                            f"{e.strerror or e}") from None

    def _negotiate(self) -> tuple[int, int, int]:
        magic, opt, hflags = struct.unpack(">QQH", recv_exact(self.sock, 18))
        if magic != P.NBDMAGIC or opt != P.IHAVEOPT or not hflags & P.FLAG_FIXED_NEWSTYLE:
            raise QcowError("not a fixed newstyle NBD server")
        no_zeroes = bool(hflags & P.FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | (P.FLAG_NO_ZEROES if no_zeroes else 0)))
        if self.addr.tls:
            self._starttls()
        name = self.addr.export.encode()
        if self._option(P.OPT_STRUCTURED_REPLY)[-1][0] == P.REP_ACK:
            self.structured = True
            q = self.meta_context.encode()
            body = struct.pack(">I", len(name)) + name + struct.pack(">II", 1, len(q)) + q
            for rtype, data in self._option(P.OPT_SET_META_CONTEXT, body):
                if rtype == P.REP_META_CONTEXT and data[4:] == q:
                    self.meta_id = struct.unpack(">I", data[:4])[0]
        replies = self._option(P.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, P.INFO_BLOCK_SIZE))
        last_type, last_data = replies[-1]
        if last_type == P.REP_ERR_UNSUP:  # an old server: EXPORT_NAME, and no structured replies
            self.sock.sendall(P.OPTION.pack(P.IHAVEOPT, P.OPT_EXPORT_NAME, len(name)) + name)
            size, flags = struct.unpack(">QH", recv_exact(self.sock, 10))
            if not no_zeroes:
                recv_exact(self.sock, 124)
            return size, flags, P.MAX_BUFFER
        if last_type != P.REP_ACK:
            text = last_data.decode("utf-8", "replace") or f"error 0x{last_type:x}"
            raise QcowError(f"Requested export not available: {text}")
        size = flags = None
        max_block = P.MAX_BUFFER
        for rtype, data in replies:
            if rtype != P.REP_INFO or len(data) < 2:
                continue
            kind = struct.unpack(">H", data[:2])[0]
            if kind == P.INFO_EXPORT and len(data) == P.EXPORT_INFO.size:
                _, size, flags = P.EXPORT_INFO.unpack(data)
            elif kind == P.INFO_BLOCK_SIZE and len(data) == P.BLOCK_SIZE_INFO.size:
                max_block = min(P.BLOCK_SIZE_INFO.unpack(data)[3], P.MAX_BUFFER) or P.MAX_BUFFER
        if size is None or flags is None:
            raise QcowError("the server sent no export information")
        return size, flags, max_block

    def _starttls(self, hostname: str | None = None) -> None:
        """Upgrade to TLS, trusting DIR/ca-cert.pem and presenting DIR/client-cert.pem if there is one.

        The server's name is checked against ``hostname`` (default: the URI's host); a unix socket
        has none, so there only the chain to the CA is checked."""
        rtype, text = self._option(P.OPT_STARTTLS)[-1]
        if rtype != P.REP_ACK:
            raise QcowError(f"The server refused TLS: {text.decode('utf-8', 'replace') or hex(rtype)}")
        d = self.addr.tls_dir
        hostname = hostname or self.addr.host
        try:
            ctx = ssl.create_default_context(cafile=os.path.join(d, "ca-cert.pem") if d else None)
            ctx.check_hostname = hostname is not None
            if d and os.path.exists(os.path.join(d, "client-cert.pem")):
                ctx.load_cert_chain(os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem"))
        except (OSError, ssl.SSLError) as e:
            raise QcowError(f"Unable to load TLS credentials from {d}: {e}") from None
        try:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=hostname)
        except (OSError, ssl.SSLError) as e:
            raise QcowError(f"TLS handshake failed: {e}") from None

    def _option(self, opt: int, body: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; its replies up to the final ACK or error."""
        self.sock.sendall(P.OPTION.pack(P.IHAVEOPT, opt, len(body)) + body)
        out = []
        while True:
            magic, ropt, rtype, n = P.OPTION_REPLY.unpack(recv_exact(self.sock, P.OPTION_REPLY.size))
            if magic != P.REPLY_MAGIC_OPT or ropt != opt or n > P.MAX_OPTION:
                raise QcowError("malformed option reply")
            out.append((rtype, bytes(recv_exact(self.sock, n))))
            if rtype == P.REP_ACK or rtype & P.REP_ERR:
                return out

    # ------------------------------------------------------------------ requests
    def _request(self, cmd: int, offset: int, length: int, flags: int = 0, payload=b"",
                 into: memoryview | None = None) -> list[tuple[int, bytes]]:
        """One request and its reply (filling ``into`` for READ); block status chunks are returned."""
        with self.lock:
            if self.sock.fileno() < 0:
                raise QcowError(f"'{self.filename}' is closed")
            self.handle += 1
            try:
                self.out.send(P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, self.handle, offset, length), payload)
                return self._reply(cmd, offset, into)
            except Disconnected as e:
                raise QcowError(f"'{self.filename}': connection lost ({e})") from None

    def _reply(self, cmd: int, offset: int, into: memoryview | None) -> list[tuple[int, bytes]]:
        magic = struct.unpack(">I", recv_exact(self.sock, 4))[0]
        if magic == P.SIMPLE_REPLY_MAGIC:
            err, handle = struct.unpack(">IQ", recv_exact(self.sock, 12))
            self._check_handle(handle)
            if err:
                raise _error(err, P.COMMAND_NAMES.get(cmd, str(cmd)))
            if into is not None:
                recv_into_exact(self.sock, into)
            return []
        chunks: list[tuple[int, bytes]] = []
        error = None
        while True:
            if magic != P.STRUCTURED_REPLY_MAGIC:
                raise Disconnected(f"bad reply magic 0x{magic:08x}")
            rflags, rtype, handle, n = struct.unpack(">HHQI", recv_exact(self.sock, 16))
            self._check_handle(handle)
            if rtype == P.REPLY_TYPE_OFFSET_DATA and into is not None:
                start = struct.unpack(">Q", recv_exact(self.sock, 8))[0] - offset
                if start < 0 or start + n - 8 > len(into):
                    raise Disconnected("data chunk outside the request")
                recv_into_exact(self.sock, into[start:start + n - 8])
            else:
                if n > P.MAX_BUFFER + 64:
                    raise Disconnected("oversized reply chunk")
                body = bytes(recv_exact(self.sock, n))
                if rtype == P.REPLY_TYPE_OFFSET_HOLE and into is not None:
                    start, length = struct.unpack(">QI", body)
                    start -= offset
                    if start < 0 or start + length > len(into):
                        raise Disconnected("hole chunk outside the request")
                    into[start:start + length] = bytes(length)
                elif rtype & 0x8000:
                    error = struct.unpack(">I", body[:4])[0]
                else:
                    chunks.append((rtype, body))
            if rflags & P.REPLY_FLAG_DONE:
                break
            magic = struct.unpack(">I", recv_exact(self.sock, 4))[0]
        if error is not None:
            raise _error(error, P.COMMAND_NAMES.get(cmd, str(cmd)))
        return chunks

    def _check_handle(self, handle: int) -> None:
        if handle != self.handle:
            raise Disconnected(f"reply for an unknown request {handle}")

    # ------------------------------------------------------------------ BlockDevice
    @property
    def size(self) -> int:
        return self._size

    def preadinto(self, buf: bytearray | memoryview, offset: int) -> None:
        view = memoryview(buf).cast("B")
        self.check_range(offset, len(view))
        for pos in range(0, len(view), self.max_block):
            part = view[pos:pos + self.max_block]
            self._request(P.CMD_READ, offset + pos, len(part), into=part)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        self._writable()
        self.check_range(offset, len(view))
        for pos in range(0, len(view), self.max_block):
            part = view[pos:pos + self.max_block]
            self._request(P.CMD_WRITE, offset + pos, len(part), payload=part)

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        self._writable()
        self.check_range(offset, length)
        if not self.flags & P.FLAG_SEND_WRITE_ZEROES:
            for pos in range(0, length, self.max_block):
                self.pwrite(bytes(min(self.max_block, length - pos)), offset + pos)
            return
        flags = 0 if unmap else P.CMD_FLAG_NO_HOLE
        for pos in range(0, length, 1 << 30):
            self._request(P.CMD_WRITE_ZEROES, offset + pos, min(1 << 30, length - pos), flags)

    def discard(self, length: int, offset: int) -> None:
        self._writable()
        self.check_range(offset, length)
        if self.flags & P.FLAG_SEND_TRIM:
            for pos in range(0, length, 1 << 30):
                self._request(P.CMD_TRIM, offset + pos, min(1 << 30, length - pos))

    def flush(self) -> None:
        if not self.read_only and self.flags & P.FLAG_SEND_FLUSH:
            self._request(P.CMD_FLUSH, 0, 0)

    def truncate(self, size: int, preallocation: str = "off") -> None:
        raise UnsupportedFeature("Image format driver does not support resize (an NBD export has a fixed size)")

    def layer_status(self, offset: int, length: int, max_extents: int | None = None) -> Iterator[LayerStatus]:
        """base:allocation as the server reports it; without that context, all data (as QEMU assumes)."""
        self.check_range(offset, length)
        pos, end = offset, offset + length
        count = 0
        while pos < end and (max_extents is None or count < max_extents):
            if self.meta_id is None:
                yield LayerStatus(pos, end - pos, data=True, zero=False, offset=pos, filename=self.filename)
                return
            want = min(end - pos, _STATUS_MAX)
            flags = P.CMD_FLAG_REQ_ONE if max_extents == 1 else 0
            progressed = False
            for rtype, body in self._request(P.CMD_BLOCK_STATUS, pos, want, flags):
                if rtype != P.REPLY_TYPE_BLOCK_STATUS or struct.unpack(">I", body[:4])[0] != self.meta_id:
                    continue
                for i in range(4, len(body) - 7, 8):
                    n, st = P.EXTENT.unpack(body[i:i + 8])
                    n = min(n, end - pos)
                    if n == 0:
                        break
                    yield LayerStatus(pos, n, data=not st & P.STATE_HOLE, zero=bool(st & P.STATE_ZERO), offset=pos,
                                      filename=self.filename)
                    pos += n
                    count += 1
                    progressed = True
                    if pos >= end or (max_extents is not None and count >= max_extents):
                        return
            if not progressed:
                raise QcowError(f"'{self.filename}': the server sent no block status")

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(f"'{self.filename}' is opened read-only")

    def _close_self(self) -> None:
        if self.sock.fileno() < 0:
            return
        try:
            if hasattr(self, "out"):
                self.flush()
        except QcowError:
            pass
        try:
            with self.lock:
                self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()


def _error(wire: int, what: str) -> QcowError:
    code = P.error_from_wire(wire)
    text = os.strerror(code)
    if code == errno.EPERM:
        return ReadOnlyError(f"{what}: {text}")
    if code == errno.EINVAL:
        return InvalidArgument(f"{what}: {text}")
    err = QcowError(f"{what}: {text}")
    err.errno = code  # type: ignore[attr-defined]
    return err


def open_nbd(uri: str, writable: bool, fmt: str | None, backing: bool = True) -> BlockDevice:
    """The export as ``fmt`` (probed when None: a qcow2 image in a raw export opens as qcow2, over
    the export as its host file (block/nbdfile.py), with its backing file when that is named by
    an absolute path or a URI)."""
    from ..format.constants import MAGIC

    dev = NbdDevice(uri, read_only=not writable)
    try:
        if fmt is None:
            fmt = "qcow2" if dev.size >= 4 and dev.pread(4, 0) == MAGIC else "raw"
        if fmt == "raw":
            return dev
        if fmt != "qcow2":
            raise InvalidArgument(f"Unknown driver '{fmt}'")
        from ..qcow2.image import Qcow2Image
        from .qcow2 import Qcow2Device

        dev.close()  # the engine opens its own connection (qemu-nbd serves one at a time)
        q = Qcow2Device(Qcow2Image.open(uri, writable=writable), dev.display_name)
        q.display_name = dev.display_name  # type: ignore[attr-defined]
        name = q.image.header.backing_file
        if backing and name:
            try:
                if not (is_nbd_uri(name) or os.path.isabs(name)):  # relative to what? QEMU refuses too
                    raise QcowError("Cannot generate a base directory for NBD nodes")
                from .open import open_image
                q.attach_backing(open_image(name, "r", q.image.header.backing_format))
            except BaseException:
                q.close()
                raise
        return q
    except BaseException:
        dev.close()
        raise
