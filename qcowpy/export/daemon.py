"""The storage daemon's state: block nodes, exports and monitors, as qemu-storage-daemon
assembles them from ``--blockdev``/``--export``/``--chardev``/``--monitor`` and QMP.

A node is a BlockDevice opened through :func:`qcowpy.block.open.open_image` with a lock that
every export of it holds while it touches the device. Export types register in ``EXPORT_TYPES``
(name -> factory), so another server (NBD) can plug in without changing this module; until one
does, ``type=nbd`` fails as QSD does when no NBD server runs. Error messages are QSD's.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

from qcowpy.block.open import open_image
from qcowpy.crypto.secret import SecretError
from qcowpy.errors import QcowError
from qcowpy.qcow2.encryption import EncryptionError

from .keyval import OptionError, no_more, take, take_bool, take_int

log = logging.getLogger(__name__)

MAX_QUEUES = 64  # QSD has no limit; every queue costs a ring mapping and a descriptor here


class BlockNode:
    """A named, opened block device and the lock its exports share."""

    def __init__(self, name: str, driver: str, dev: Any, filename: str, child: Optional[str]) -> None:
        self.name = name
        self.driver = driver
        self.dev = dev
        self.filename = filename
        self.child = child  # the protocol node under a format node (named or implicit)
        self.lock = threading.Lock()
        self.users = 0
        self.discard = False  # discard=unmap: exports may free space on TRIM
        self.detect_zeroes = "off"

    def info(self) -> dict[str, Any]:
        size = self.dev.size
        img: dict[str, Any] = {"virtual-size": size, "filename": self.filename, "format": self.driver,
                               "dirty-flag": False}
        cs = self.dev.cluster_size
        if cs:
            img["cluster-size"] = cs
        return {"node-name": self.name, "drv": self.driver, "file": self.filename, "ro": self.dev.read_only,
                "image": img, "backing_file_depth": len(self.dev.chain) - 1,
                "encrypted": getattr(getattr(self.dev, "image", None), "crypto", None) is not None,
                "detect_zeroes": "off", "cache": {"writeback": True, "direct": False, "no-flush": False}}


class Export:
    """What every export offers the daemon."""

    type: str
    id: str
    node: BlockNode

    def in_use(self) -> bool:
        return False

    def close(self) -> None:
        raise NotImplementedError


ExportFactory = Callable[["Daemon", str, BlockNode, bool, dict[str, Any]], Export]
EXPORT_TYPES: dict[str, ExportFactory] = {}


def register_export_type(name: str, factory: ExportFactory) -> None:
    """Let an export server (vhost-user-blk, FUSE, NBD) serve ``--export type=name``."""
    EXPORT_TYPES[name] = factory


class Daemon:
    """Nodes and exports of one storage daemon; every method raises OptionError/QcowError with
    QSD's message, so the CLI and QMP report the same words."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}
        self.exports: dict[str, Export] = {}
        self.lock = threading.RLock()
        self.events: list[Callable[[str, dict[str, Any]], None]] = []
        self._implicit = 0
        self.cleanups: list[Callable[[], None]] = []  # run last by shutdown() (monitor sockets)
        self.objects: dict[str, dict[str, Any]] = {}  # --object / object-add, by id
        self.nbd: Any = None  # the running NBD server (export/nbd/service.py), if any

    # -- block nodes ----------------------------------------------------------------------------
    def node(self, name: str, reference: bool = False) -> BlockNode:
        """The node ``name``; ``reference``: named as a child (QSD then names it as a device too)."""
        n = self.nodes.get(name)
        if n is None:
            raise OptionError(f"Cannot find device='{name if reference else ''}' nor node-name='{name}'")
        return n

    def blockdev_add(self, opts: dict[str, Any], root: bool = True) -> BlockNode:
        opts = dict(opts)
        driver = take(opts, "driver", required=True)
        name = take(opts, "node-name")
        if name is None:
            if root:
                raise OptionError("'node-name' must be specified for the root node")
            self._implicit += 1
            name = f"#block{self._implicit:03d}"
        if name in self.nodes:
            raise OptionError(f"Duplicate nodes with node-name='{name}'")
        read_only = take_bool(opts, "read-only", False)
        discard = take(opts, "discard", default="ignore")
        if discard not in ("ignore", "off", "unmap", "on"):
            raise OptionError(f"Parameter 'discard' does not accept value '{discard}'")
        detect_zeroes = take(opts, "detect-zeroes", default="off")
        if detect_zeroes not in ("off", "on", "unmap"):
            raise OptionError(f"Parameter 'detect-zeroes' does not accept value '{detect_zeroes}'")
        opts.pop("auto-read-only", None)
        opts.pop("cache", None)
        if driver == "file":
            filename = take(opts, "filename", required=True)
            no_more(opts)
            dev = self._open(filename, "raw", read_only)
            node = BlockNode(name, "file", dev, filename, None)
        elif driver in ("qcow2", "raw", "luks"):
            file = take(opts, "file", required=True)
            encrypt = take(opts, "encrypt") if driver == "qcow2" else None  # encrypt.key-secret=ID
            if driver == "luks":  # the LUKS container: key-secret=ID on the node itself
                sid = take(opts, "key-secret")
                encrypt = {"key-secret": sid} if sid is not None else None
            no_more(opts)
            if isinstance(file, str):
                child = self.node(file, reference=True)
                if child.driver != "file":
                    raise OptionError(f"'{file}' is not a protocol node")
                filename = child.filename
                child_name = file
            else:
                filename = self._file_child(file)
                child_name = None
            dev = self._open(filename, driver, read_only, encrypt)
            node = BlockNode(name, driver, dev, filename, child_name)
        elif driver == "rbd":  # Ceph RBD: BlockdevOptionsRbd (pool, image, conf, user, ...), block/rbd.py
            from qcowpy.block.spec import open_spec
            try:
                dev = open_spec({"driver": "rbd", **opts}, "r" if read_only else "r+")
            except QcowError as e:
                raise OptionError(str(e)) from None
            node = BlockNode(name, "rbd", dev, dev.display_name, None)
        else:
            raise OptionError(f"Parameter 'driver' does not accept value '{driver}'")
        node.discard = discard in ("unmap", "on")
        node.detect_zeroes = detect_zeroes if detect_zeroes != "unmap" or node.discard else "on"
        with self.lock:
            self.nodes[name] = node
        return node

    @staticmethod
    def _file_child(file: Any) -> str:
        if not isinstance(file, dict):
            raise OptionError("Parameter 'file' expects a node name or options")
        file = dict(file)
        drv = take(file, "driver", required=True)
        if drv != "file":
            raise OptionError(f"Parameter 'file.driver' does not accept value '{drv}'")
        filename = take(file, "filename", required=True)
        for ignored in ("aio", "locking", "cache"):
            file.pop(ignored, None)
        no_more(file, "file.")
        return str(filename)

    @staticmethod
    def _open(filename: str, fmt: str, read_only: bool, encrypt: Any = None) -> Any:
        try:
            return open_image(filename, "r" if read_only else "r+", format=fmt,
                              encrypt=encrypt if isinstance(encrypt, dict) else None)
        except (EncryptionError, SecretError) as e:  # the format driver's own words, unprefixed as in QEMU
            raise OptionError(str(e)) from None
        except QcowError as e:
            msg = str(e)
            raise OptionError(msg if msg.startswith("Could not open") else f"Could not open '{filename}': {msg}") \
                from None
        except OSError as e:
            raise OptionError(f"Could not open '{filename}': {e.strerror}") from None

    def blockdev_del(self, name: str) -> None:
        with self.lock:
            node = self.nodes.get(name)
            if node is None:
                raise OptionError(f"Failed to find node with node-name='{name}'")
            if node.users or any(n.child == name for n in self.nodes.values()):
                raise OptionError(f"Node {name} is in use")
            del self.nodes[name]
        node.dev.close()

    # -- exports --------------------------------------------------------------------------------
    def export_add(self, opts: dict[str, Any]) -> Export:
        opts = dict(opts)
        etype = take(opts, "type", required=True)
        if etype not in ("vhost-user-blk", "fuse", "nbd") and etype not in EXPORT_TYPES:
            raise OptionError(f"Parameter 'type' does not accept value '{etype}'")
        eid = take(opts, "id", required=True)
        name = take(opts, "node-name", required=True)
        writable = take_bool(opts, "writable", False)
        for ignored in ("writethrough", "fixed-iothread"):
            opts.pop(ignored, None)
        iothread = take(opts, "iothread")  # accepted; every export is served by its own threads anyway
        with self.lock:
            if eid in self.exports:
                raise OptionError(f"Block export id '{eid}' is already in use")
            node = self.node(name)
            if writable and node.dev.read_only:
                raise OptionError("Cannot export read-only node as writable")
            if iothread is not None and self.objects.get(iothread, {}).get("qom-type") != "iothread":
                raise OptionError(f'iothread "{iothread}" not found')
            factory = EXPORT_TYPES.get(etype)
            if factory is None:
                if etype == "nbd":
                    raise OptionError("NBD server not running")
                raise OptionError(f"Export type '{etype}' is not supported by this build")
            exp = factory(self, eid, node, writable, opts)
            node.users += 1
            self.exports[eid] = exp
        return exp

    def export_del(self, eid: str, mode: str = "safe") -> None:
        with self.lock:
            exp = self.exports.get(eid)
            if exp is None:
                raise OptionError(f"Export '{eid}' is not found")
            if mode not in ("safe", "hard"):
                raise OptionError(f"Parameter 'mode' does not accept value '{mode}'")
            if mode == "safe" and exp.in_use():
                raise OptionError(f"export '{eid}' still in use")
            del self.exports[eid]
            exp.node.users -= 1
        exp.close()
        for emit in list(self.events):
            emit("BLOCK_EXPORT_DELETED", {"id": eid})

    def query_exports(self) -> list[dict[str, Any]]:
        return [{"type": e.type, "id": e.id, "node-name": e.node.name, "shutting-down": False}
                for e in self.exports.values()]

    def query_nodes(self) -> list[dict[str, Any]]:
        return [n.info() for n in self.nodes.values()]

    # -- shutdown -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every export, then flush and close every node (SIGTERM, QMP quit)."""
        with self.lock:
            exports, self.exports = list(self.exports.values()), {}
            nodes, self.nodes = list(self.nodes.values()), {}
        for exp in exports:
            try:
                exp.close()
            except Exception as e:  # keep closing the rest: the images matter more
                log.warning("closing export %s: %s", exp.id, e)
        nbd, self.nbd = self.nbd, None
        if nbd is not None:
            nbd.stop()
        for node in nodes:
            with node.lock:
                try:
                    if not node.dev.read_only:
                        node.dev.flush()
                finally:
                    node.dev.close()
        cleanups, self.cleanups = self.cleanups, []
        for fn in cleanups:
            fn()


# -- vhost-user-blk ------------------------------------------------------------------------------

class VhostUserBlkExport(Export):
    type = "vhost-user-blk"

    def __init__(self, daemon: Daemon, eid: str, node: BlockNode, writable: bool, opts: dict[str, Any]) -> None:
        from .vhost_user import VhostUserBlkServer

        addr = take(opts, "addr", required=True)
        if not isinstance(addr, dict):
            raise OptionError("Parameter 'addr' expects a socket address")
        addr = dict(addr)
        atype = take(addr, "type", required=True)
        if atype not in ("unix", "fd", "inet", "vsock"):
            raise OptionError(f"Parameter 'addr.type' does not accept value '{atype}'")
        if atype != "unix":
            raise OptionError("Only socket address types 'unix' and 'fd' are supported")
        path = str(take(addr, "path", required=True))
        addr.pop("abstract", None)
        no_more(addr, "addr.")
        lbs = take_int(opts, "logical-block-size", 512)
        if lbs < 512 or lbs > 2 << 20:
            raise OptionError(f"Property {eid}.logical-block-size doesn't take value {lbs} "
                              "(minimum: 512, maximum: 2097152)")
        if lbs & (lbs - 1):
            raise OptionError(f"Property {eid}.logical-block-size doesn't take value '{lbs}', "
                              "it's not a power of 2")
        nq = take_int(opts, "num-queues", 1)
        if nq <= 0:
            raise OptionError("num-queues must be greater than 0")
        if nq > MAX_QUEUES:
            raise OptionError(f"num-queues must be at most {MAX_QUEUES}")
        no_more(opts)
        self.id, self.node = eid, node
        try:
            self.server = VhostUserBlkServer(path, node.dev, node.lock, writable=writable, num_queues=nq,
                                             logical_block_size=lbs, serial=eid).start()
        except OSError as e:
            raise OptionError(f"Failed to bind socket to {path}: {e.strerror}") from None

    def in_use(self) -> bool:
        return self.server.connected

    def close(self) -> None:
        self.server.close()


register_export_type("vhost-user-blk", VhostUserBlkExport)
