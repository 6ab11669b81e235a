"""``info``: qemu-img's ImageInfo (keys, value types, order) and its human rendering."""
from __future__ import annotations

import os

from ..block.device import BlockDevice
from ..block.open import open_image, resolve_backing_path
from ..block.spec import canonical_name
from ..errors import QcowError
from ..units import format_size
from .qjson import QDict, dumps_pretty, qdict_order


def image_info(dev: BlockDevice, filename: str) -> QDict:
    """One ImageInfo, keys inserted in QAPI schema order (printing reorders them like QEMU)."""
    info = QDict()
    info["filename"] = dev.display_name or filename  # protocol drivers name images as QEMU does
    info["format"] = dev.format
    h = dev.format_info()
    if h is not None or dev.has_image_info:  # QEMU's nbd driver has no get_info
        info["dirty-flag"] = h.dirty if h else False
    actual = dev.allocated_size()
    if actual is not None:
        info["actual-size"] = actual
    info["virtual-size"] = dev.size
    if h is None and dev.cluster_size:  # a protocol with an allocation unit (rbd: the object size)
        info["cluster-size"] = dev.cluster_size
    if h is None and dev.supports_snapshots:  # a protocol's own snapshots (rbd)
        rows = snapshot_rows(dev)
        if rows:
            info["snapshots"] = rows
    specific = getattr(dev, "specific_info", None)
    if h is None and specific is not None and specific() is not None:  # e.g. a bare rbd node: {"type": "rbd"}
        kind, fields = specific()
        spec = QDict()
        spec["type"] = kind
        spec["data"] = _encrypt_info(fields)  # a luks node's slots are QDicts too
        info["format-specific"] = spec
    if h is None and getattr(dev, "encrypted", False):  # the luks format
        info["encrypted"] = True
    if h is not None:
        info["cluster-size"] = h.cluster_size
        if h.encrypt is not None:
            info["encrypted"] = True
        if h.backing_file:
            info["backing-filename"] = h.backing_file
            absolute_file = h.backing_file.startswith("file:") and h.backing_file[5:].startswith("/")
            info["full-backing-filename"] = h.backing_file if absolute_file else \
                resolve_backing_path(filename, h.backing_file)  # QEMU keeps an absolute file: name
            if h.backing_format:
                info["backing-filename-format"] = h.backing_format
        snaps = snapshot_rows(dev)
        if snaps:
            info["snapshots"] = snaps
        data = QDict()
        if h.version == 2:
            data["compat"] = "0.10"
            data["refcount-bits"] = h.refcount_bits
        else:
            data["compat"] = "1.1"
            if h.data_file:
                data["data-file"] = h.data_file
            if h.data_file or getattr(getattr(dev, "image", None), "external_data", False):
                data["data-file-raw"] = h.data_file_raw  # even when the header names no file, as QEMU
            data["extended-l2"] = h.extended_l2
            data["lazy-refcounts"] = h.lazy_refcounts
            data["corrupt"] = h.corrupt
            data["refcount-bits"] = h.refcount_bits
        if h.encrypt is not None:
            data["encrypt"] = _encrypt_info(h.encrypt)
        if h.version >= 3:
            bitmaps = bitmap_rows(dev)
            if bitmaps:
                data["bitmaps"] = bitmaps
        data["compression-type"] = h.compression_type
        spec = QDict()
        spec["type"] = "qcow2"
        spec["data"] = data
        info["format-specific"] = spec
    return info


def bitmap_rows(dev: BlockDevice) -> list:
    """qemu-img's Qcow2BitmapInfo list: flags (in-use, auto), name, granularity."""
    out = []
    for bm in dev.bitmaps():
        d = QDict()
        d["name"] = bm.name.decode("utf-8", "surrogateescape")
        d["granularity"] = 1 << bm.granularity_bits
        d["flags"] = [f for f, on in (("in-use", bm.in_use), ("auto", bm.enabled)) if on]
        out.append(d)
    return out


def _encrypt_info(enc: dict) -> QDict:
    """QCryptoBlockInfo as QDicts (so human and JSON output order their keys as QEMU does)."""
    out = QDict()
    for k, v in enc.items():
        out[k] = [QDict(s) for s in v] if k == "slots" else v
    return out


def snapshot_rows(dev: BlockDevice) -> list:
    try:
        snaps = dev.snapshots()
    except QcowError:
        return []
    out = []
    for s in snaps:
        d = QDict()
        d["id"] = s.id_str
        d["name"] = s.name
        d["vm-state-size"] = s.vm_state_size_large
        d["date-sec"] = s.date_sec
        d["date-nsec"] = s.date_nsec
        d["vm-clock-sec"] = s.vm_clock_nsec // 1000000000
        d["vm-clock-nsec"] = s.vm_clock_nsec % 1000000000
        icount = s.icount
        if icount is not None:
            d["icount"] = icount
        out.append(d)
    return out


def collect(filename: str, fmt: str | None, chain: bool, force_share: bool = False) -> list[QDict]:
    """ImageInfo for ``filename`` and, with ``chain``, every backing file below it (top first)."""
    out: list[QDict] = []
    seen: set[tuple[int, int]] = set()
    name: str | None = filename
    while name:
        try:
            st = os.stat(name)
            ident = (st.st_dev, st.st_ino)
        except OSError:
            ident = None
        if ident is not None and ident in seen:
            raise QcowError(f"Backing file '{name}' creates an infinite loop.")
        if ident is not None:
            seen.add(ident)
        try:
            dev = open_image(name, "r", fmt, backing=False, force_share=force_share, no_io=True)
        except QcowError as e:
            raise QcowError(f"Could not open '{name}': {e}") from None
        with dev:
            info = image_info(dev, canonical_name(name))
        out.append(info)
        if not chain:
            break
        name = info.get("full-backing-filename")
        name = canonical_name(name) if name else name
        fmt = info.get("backing-filename-format")
    return out


def human(info: dict) -> str:
    """qemu-img's human rendering of one ImageInfo."""
    lines = [
        f"image: {info['filename']}",
        f"file format: {info['format']}",
        f"virtual size: {format_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        "disk size: " + (format_size(info["actual-size"]) if "actual-size" in info else "unavailable"),
    ]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if "backing-filename" in info:
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if full is None:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(snapshot_header())
        for s in info["snapshots"]:
            lines.append(snapshot_line(s))
    if "format-specific" in info:
        lines.append("Format specific information:")
        _dump(info["format-specific"]["data"], 1, lines)
    return "\n".join(lines) + "\n"


def _dump(obj, indent: int, lines: list[str]) -> None:
    if isinstance(obj, dict):
        items = qdict_order(obj) if isinstance(obj, QDict) else obj
        for k, v in items.items():
            key = k.replace("-", " ")
            if isinstance(v, (dict, list)):
                lines.append(f"{' ' * (4 * indent)}{key}:")
                _dump(v, indent + 1, lines)
            else:
                lines.append(f"{' ' * (4 * indent)}{key}: {_scalar(v)}")
    else:
        for i, v in enumerate(obj):
            if isinstance(v, (dict, list)):
                lines.append(f"{' ' * (4 * indent)}[{i}]:")
                _dump(v, indent + 1, lines)
            else:
                lines.append(f"{' ' * (4 * indent)}[{i}]: {_scalar(v)}")


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def snapshot_header() -> str:
    return "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")


def snapshot_line(s: dict) -> str:
    import time
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["date-sec"]))
    secs = s["vm-clock-sec"]
    clock = "%02d:%02d:%02d.%03d" % (secs // 3600, (secs // 60) % 60, secs % 60, (s["vm-clock-nsec"] // 1000000) % 1000)
    icount = str(s["icount"]) if "icount" in s else ""
    return "%-9s %-16s %8s%20s%13s%11s" % (s["id"], s["name"], format_size(s["vm-state-size"]), date, clock, icount)


def render(infos: list[QDict], output: str, chain: bool) -> str:
    if output == "json":
        return dumps_pretty(infos if chain else infos[0]) + "\n"
    return "\n".join(human(i) for i in infos)
