"""Block node specifications: ``json:{...}`` filenames and ``--image-opts`` strings.

Both describe a tree of nodes as QEMU's ``-blockdev`` does: a format node (``qcow2``, ``raw``)
over a protocol node (``file``), or ``null-co``. Dotted keys (``file.filename``) and nested
objects mean the same. The drivers known here are the ones users script with qemu-img; QEMU's
debugging drivers (blkdebug, blkverify, throttle, quorum) are refused as unknown.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterator

from ..errors import InvalidArgument, QcowError
from ..qdict import qdict_order
from .device import BlockDevice, LayerStatus, status_at

SUPPORTED_DRIVERS = ("qcow2", "raw", "luks", "file", "null-co", "rbd")


class SpecError(QcowError):
    """A node specification qemu-img would refuse; the message is QEMU's."""


def is_json_filename(name: str) -> bool:
    return isinstance(name, str) and name.startswith("json:")


def file_protocol_path(name: str) -> str:
    """``file:PATH`` names PATH itself, colons and all (QEMU's file protocol prefix). A relative
    PATH whose first component has a colon becomes ``./PATH``, as QEMU shows it, so that it is
    never taken for a protocol again."""
    if not isinstance(name, str) or not name.startswith("file:"):
        return name
    path = name[len("file:"):]
    if not os.path.isabs(path) and ":" in path.split("/", 1)[0]:
        path = "./" + path
    return path


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"file.filename": x}`` -> ``{"file": {"filename": x}}``, merging with nested objects."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if isinstance(value, dict):
            value = nest(value)
        head, dot, rest = key.partition(".")
        if dot:
            sub = out.setdefault(head, {})
            if not isinstance(sub, dict):
                raise SpecError(f"Value for parameter {head} was already given")
            _merge(sub, nest({rest: value}))
        elif isinstance(value, dict) and isinstance(out.get(head), dict):
            _merge(out[head], value)
        else:
            out[head] = value
    return out


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Deep update: ``server.0.host`` and ``server.0.port`` both land in ``server["0"]``."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def parse_json_filename(name: str) -> dict[str, Any]:
    """The options of a ``json:{...}`` filename."""
    try:
        obj = json.loads(_single_quotes_to_double(name[len("json:"):]))
    except json.JSONDecodeError as e:
        raise SpecError(f"Could not parse the JSON options: JSON parse error, {e.msg}") from None
    if not isinstance(obj, dict):
        raise SpecError("Invalid JSON object given")
    return nest(obj)


def _single_quotes_to_double(text: str) -> str:
    """QEMU's JSON parser also takes 'single-quoted' strings (its own extension, used in QEMU's
    docs and tests): rewrite them as standard strings, leaving double-quoted ones alone."""
    if "'" not in text:
        return text
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c not in "'\"":
            out.append(c)
            i += 1
            continue
        j, body = i + 1, []
        while j < n and text[j] != c:
            if text[j] == "\\" and j + 1 < n:
                body.append(text[j:j + 2])
                j += 2
                continue
            body.append(text[j])
            j += 1
        raw = "".join(body)
        if c == "'":  # \' means a quote; a bare " needs escaping in a standard string
            raw = raw.replace("\\'", "'").replace('"', '\\"')
        out.append('"' + raw + '"')
        i = j + 1
    return "".join(out)


def parse_image_opts(text: str) -> dict[str, Any]:
    """QemuOpts syntax as ``--image-opts`` takes it: ``key=value,key=value`` (``,,`` is a comma)."""
    flat: dict[str, Any] = {}
    for item in split_opts(text):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:  # a bare word is a boolean flag in QemuOpts
            key, value = (key[2:], "off") if key.startswith("no") else (key, "on")
        flat[key] = value
    return nest(flat)


def split_opts(text: str) -> list[str]:
    """QEMU's comma-separated option parts, where ``,,`` is a literal comma (QemuOpts and
    keyval alike): the one splitter every option parser here uses."""
    items, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    items.append("".join(cur))
    return items


def _int(opts: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = opts.get(key, default)
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return int(str(value), 0)
    except ValueError:
        raise SpecError(f"Parameter '{key}' expects a non-negative number below 2^64") from None


def _bool(opts: dict[str, Any], key: str) -> bool:
    value = opts.get(key, False)
    if isinstance(value, bool):
        return value
    if str(value) in ("on", "true", "yes"):
        return True
    if str(value) in ("off", "false", "no"):
        return False
    raise SpecError(f"Parameter '{key}' expects 'on' or 'off'")


def spec_filename(opts: dict[str, Any]) -> str | None:
    """The host file a spec ends in (``file.filename``, or ``filename`` on a protocol node)."""
    if "filename" in opts and opts.get("driver", "file") == "file":
        return str(opts["filename"])
    child = opts.get("file")
    if isinstance(child, str):
        return child
    if isinstance(child, dict):
        return spec_filename(child)
    return None


def plain_file(opts: dict[str, Any]) -> tuple[str, str | None] | None:
    """(filename, format) when ``opts`` is just a format (or nothing) over a plain file, which
    every tool opens the ordinary way; None when the spec needs this module's drivers."""
    if not set(opts) <= {"driver", "file"} or opts.get("driver") not in ("qcow2", "raw", "luks", None):
        return None
    child = opts.get("file")
    if isinstance(child, dict) and set(child) <= {"driver", "filename", "locking"} \
            and child.get("driver", "file") == "file":  # locking: qcowpy's locks follow -U and QCOWPY_LOCKING
        child = child.get("filename")
    return (str(child), opts.get("driver")) if isinstance(child, str) else None


def key_options(opts: dict[str, Any], pop: bool = False) -> dict[str, Any] | None:
    """The options that unlock an encrypted node: qcow2's ``encrypt.*`` (``encrypt.key-secret=ID``),
    or the luks driver's own ``key-secret=ID`` (as ``{"key-secret": ID}``); ``pop`` takes them off."""
    get = opts.pop if pop else opts.get
    if isinstance(opts.get("encrypt"), dict):
        return get("encrypt")  # type: ignore[operator]
    if opts.get("driver") == "luks" and "key-secret" in opts:
        return {"key-secret": get("key-secret")}  # type: ignore[operator]
    return None


def keyed_node_name(fmt: str, filename: str, keys: dict[str, Any]) -> str:
    """The ``json:`` name QEMU gives a format node over a plain file opened with key options
    (``encrypt.*`` flat in a qcow2 node, ``key-secret`` in a luks node), as info shows it."""
    node: dict[str, Any] = {("" if fmt == "luks" else "encrypt.") + k: v for k, v in keys.items()}
    node["driver"] = fmt
    node["file"] = qdict_order({"driver": "file", "filename": filename})
    return "json:" + json.dumps(qdict_order(node))


def canonical_name(name: str) -> str:
    """The name QEMU gives an opened node: ``file:PATH`` and a ``json:`` spec that is only a
    format over a plain file are named by that file (as ``info --backing-chain`` lists them).
    A ``data-file`` child does not count: QEMU names a node by its primary child unless a strong
    option or an overridden backing file says otherwise, and the data file is neither."""
    if is_json_filename(name):
        try:
            opts = parse_json_filename(name)
        except SpecError:
            return name
        simple = plain_file({k: v for k, v in opts.items() if k != "data-file"})
        return simple[0] if simple is not None else name
    return file_protocol_path(name)


def open_spec(opts: dict[str, Any], mode: str = "r", force_share: bool = False,
              backing_chain: bool = True, no_io: bool = False) -> BlockDevice:
    """Open the node tree ``opts`` describes (already nested); ``backing_chain`` False opens
    the top node alone, as ``open_image(backing=False)`` does."""
    from .open import open_image, probe_format  # open.py hooks in here: import lazily
    driver = opts.get("driver")
    if driver == "nbd":
        return _nbd_node(opts, mode)
    if driver is not None and driver not in SUPPORTED_DRIVERS:
        raise SpecError(f"Unknown driver '{driver}'")
    if driver == "null-co":
        return NullDevice(_int(opts, "size", 1 << 30) or 0, _bool(opts, "read-zeroes"))
    if driver == "rbd" or isinstance(opts.get("file"), dict) and opts["file"].get("driver") == "rbd":
        from .rbdopen import open_rbd_image, rbd_options  # Ceph: block/rbd.py
        writable = "+" in mode or mode == "rw"
        return open_rbd_image(rbd_options(opts), writable, None if driver == "rbd" else driver,  # type: ignore[arg-type]
                              backing_chain, force_share=force_share, bare=driver == "rbd")
    child = opts.get("file")
    if isinstance(child, dict) and child.get("driver", "file") not in SUPPORTED_DRIVERS:
        raise SpecError(f"Unknown driver '{child.get('driver')}'")
    path = spec_filename(opts)
    if path is None:
        raise SpecError('A block device must be specified for "file"')
    if not os.path.exists(path):
        raise SpecError(f"Could not open '{path}': No such file or directory")
    if driver in ("file", None) and "file" not in opts:
        driver = "raw"  # a bare protocol node: its bytes as they are
    fmt = driver or probe_format(path)
    if fmt == "raw" and ("offset" in opts or "size" in opts):
        return _raw_window(open_image(path, mode, "raw", force_share=force_share), opts)
    backing = opts.get("backing", ...)
    encrypt = key_options(opts)
    data_file = opts.get("data-file")  # the external data file, overriding the header's name
    if isinstance(data_file, dict):
        data_file = spec_filename({"file": data_file})
    extra = {"data_file": str(data_file)} if data_file else {}
    dev = open_image(path, mode, fmt, backing=backing_chain and backing is ..., force_share=force_share,
                     encrypt=encrypt, no_io=no_io, **extra)
    if backing_chain and isinstance(backing, (dict, str)) and fmt == "qcow2":
        try:
            below = open_spec(backing if isinstance(backing, dict) else {"file": backing}, "r", force_share)
        except BaseException:
            dev.close()
            raise
        dev.attach_backing(below)  # type: ignore[attr-defined]
    return dev


def _nbd_node(opts: dict[str, Any], mode: str) -> BlockDevice:
    """driver=nbd with server.type=unix,server.path=... (or inet, host, port), export and
    x-dirty-bitmap (QEMU's way to read a dirty bitmap through block status)."""
    from .nbd import NbdDevice
    server = opts.get("server")
    if not isinstance(server, dict):
        raise SpecError("Parameter 'server' is missing")
    export = str(opts.get("export", ""))
    if server.get("type") == "unix":
        uri = f"nbd+unix:///{export}?socket={server.get('path', '')}"
    elif server.get("type") == "inet":
        uri = f"nbd://{server.get('host', '')}:{server.get('port', 10809)}/{export}"
    else:
        raise SpecError("Parameter 'server.type' is missing")
    return NbdDevice(uri, read_only=mode in ("r", "rb"), meta_context=opts.get("x-dirty-bitmap"))


def _raw_window(inner: BlockDevice, opts: dict[str, Any]) -> BlockDevice:
    file_size = inner.size
    offset = _int(opts, "offset", 0) or 0
    size = _int(opts, "size", None)
    if offset > file_size:
        inner.close()
        raise SpecError(f"The sum of offset ({offset}) has to be smaller or equal to the  actual size of the "
                        f"containing file ({file_size})")
    if size is None:
        size = file_size - offset
    if offset + size > file_size:
        inner.close()
        raise SpecError(f"The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual "
                        f"size of the containing file ({file_size})")
    if size % 512:
        inner.close()
        raise SpecError("Specified size is not multiple of 512")
    return WindowDevice(inner, offset, size)


class WindowDevice(BlockDevice):
    """``raw`` with ``offset``/``size``: a fixed window of another device (a partition, say)."""

    format = "raw"

    def __init__(self, inner: BlockDevice, offset: int, size: int):
        self.inner, self.offset, self._size = inner, offset, size
        self.filename = inner.filename
        self.read_only = inner.read_only

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        self.check_range(offset, length)
        return self.inner.pread(length, self.offset + offset)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.check_range(offset, len(memoryview(data).cast("B")))
        self.inner.pwrite(data, self.offset + offset)

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        self.check_range(offset, length)
        self.inner.write_zeroes(length, self.offset + offset, unmap)

    def discard(self, length: int, offset: int) -> None:
        self.check_range(offset, length)
        self.inner.discard(length, self.offset + offset)

    def flush(self) -> None:
        self.inner.flush()

    def truncate(self, size: int, preallocation: str = "off") -> None:
        raise InvalidArgument("Cannot resize a raw node with a fixed size or offset")

    def layer_status(self, offset: int, length: int, max_extents: int | None = None) -> Iterator[LayerStatus]:
        self.check_range(offset, length)
        for st in self.inner.layer_status(self.offset + offset, length, max_extents):
            yield LayerStatus(st.start - self.offset, st.length, st.data, st.zero,
                              st.offset, st.filename)

    def allocated_size(self) -> int | None:
        return self.inner.allocated_size()

    def _close_self(self) -> None:
        self.inner.close()


class ChainWindow(WindowDevice):
    """A window of a whole device chain (qemu-nbd ``-o``): block status answers for the chain, so
    bytes a backing file supplies are data, never holes that read as zeros."""

    def layer_status(self, offset: int, length: int, max_extents: int | None = None) -> Iterator[LayerStatus]:
        self.check_range(offset, length)
        pos, end, n = offset, offset + length, 0
        while pos < end and (max_extents is None or n < max_extents):
            e = status_at(self.inner, self.offset + pos, end - pos)
            yield LayerStatus(pos, e.length, e.data or not e.zero, e.zero)
            pos += e.length
            n += 1


class NullDevice(BlockDevice):
    """QEMU's ``null-co``: a disk of ``size`` bytes that forgets what is written (a sink for
    benchmarks and tests). Reads give zeros; only with ``read-zeroes`` does block status say so,
    as in QEMU (whose reads without it leave the buffer as it was)."""

    format = "null-co"
    filename = ""
    read_only = False

    def __init__(self, size: int, read_zeroes: bool = False, format: str = "null-co"):
        self._size = size
        self.read_zeroes = self.holes_read_zero = read_zeroes
        self.format = format  # "raw" when opened by filename: QEMU probes raw over the protocol

    @property
    def size(self) -> int:
        return self._size

    def pread(self, length: int, offset: int) -> bytes:
        self.check_range(offset, length)
        return bytes(length)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.check_range(offset, len(memoryview(data).cast("B")))

    def write_zeroes(self, length: int, offset: int, unmap: bool = False) -> None:
        self.check_range(offset, length)

    def discard(self, length: int, offset: int) -> None:
        self.check_range(offset, length)

    def flush(self) -> None:
        pass

    def truncate(self, size: int, preallocation: str = "off") -> None:
        self._size = size

    def layer_status(self, offset: int, length: int, max_extents: int | None = None) -> Iterator[LayerStatus]:
        self.check_range(offset, length)
        yield LayerStatus(offset, length, data=False, zero=self.read_zeroes, offset=offset if self.read_zeroes else None)

    def allocated_size(self) -> int | None:
        return 0

    def _close_self(self) -> None:
        pass
