"""Drives: images opened through ``qcowpy.block`` for the emulator's devices (QEMU's ``-drive``).

A :class:`Drive` is a named, opened ``BlockDevice`` plus the options it was created with. The
machine keeps them in ``machine.drives`` by id; ``virtio-blk-pci,drive=ID`` attaches one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..block.spec import split_opts
from .errors import EmuError

INTERFACES = ("virtio", "none")


@dataclass
class Drive:
    id: str
    file: str
    format: str
    interface: str
    read_only: bool
    serial: str
    blk: Any
    attached_to: Any = None

    def close(self) -> None:
        if self.blk is not None:
            self.blk.close()
            self.blk = None


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).lower()
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise EmuError(f"Parameter '{key}' expects 'on' or 'off'")


def parse_drive_spec(spec: str) -> dict[str, str]:
    """``file=PATH,format=F,if=virtio,...`` into a dict (``,,`` escapes a comma, as in QEMU)."""
    opts: dict[str, str] = {}
    parts = split_opts(spec)
    for p in parts:
        if not p:
            continue
        key, eq, value = p.partition("=")
        if not eq:
            if not opts and key:
                key, value = "file", key
            else:
                raise EmuError(f"-drive {spec}: option '{key}' needs a value")
        opts[key] = value
    return opts


def open_drive(opts: dict[str, Any], default_id: str) -> Drive:
    """Open the image an option dict describes (keys: file, format, if, id, readonly, serial)."""
    import qcowpy
    from qcowpy.errors import QcowError
    known = {"file", "format", "if", "id", "readonly", "serial", "media", "cache"}
    unknown = set(opts) - known
    if unknown:
        raise EmuError(f"Invalid parameter '{sorted(unknown)[0]}'")
    if "file" not in opts or not opts["file"]:
        raise EmuError("-drive: a file= is required (empty drives are not supported)")
    interface = str(opts.get("if", "virtio"))
    if interface not in INTERFACES:
        raise EmuError(f"-drive: interface '{interface}' is not supported (use if=virtio or if=none)")
    ro = _bool("readonly", opts.get("readonly", False))
    fmt: Optional[str] = opts.get("format")
    if fmt not in (None, "qcow2", "raw"):
        raise EmuError(f"Unknown driver '{fmt}'")
    try:
        blk = qcowpy.open(str(opts["file"]), "r" if ro else "r+", format=fmt)
    except QcowError as e:
        raise EmuError(str(e)) from None
    return Drive(id=str(opts.get("id") or default_id), file=str(opts["file"]), format=blk.format,
                 interface=interface, read_only=ro, serial=str(opts.get("serial", "")), blk=blk)


def info_block(drives: dict[str, Drive]) -> str:
    """QEMU's ``info block`` layout, one entry per drive."""
    lines = []
    for d in drives.values():
        ro = ", read-only" if d.read_only else ""
        lines.append(f"{d.id} (#block-{d.id}): {d.file} ({d.format}{ro})")
        if d.attached_to is not None:
            dev = d.attached_to
            where = dev.id or dev.canonical_path()
            lines.append(f"    Attached to:      {where}")
        lines.append("    Cache mode:       writeback")
        chain = getattr(d.blk, "chain", [d.blk])[1:] if d.blk is not None else []
        if chain:
            lines.append(f"    Backing file:     {chain[0].filename} (chain depth: {len(chain)})")
        lines.append("")
    return "\n".join(lines) + ("\n" if lines else "")
