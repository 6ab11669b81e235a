"""``snapshot``: qemu-img's img_snapshot (list, create, apply, delete) on a block device."""
from __future__ import annotations

from typing import Callable

from ..block.open import key_errors_name, open_image
from ..errors import CorruptImage, CorruptTable, QcowError, RefcountOverflow, SnapshotNotFound
from .info import snapshot_header, snapshot_line, snapshot_rows


class SnapshotError(QcowError):
    pass


def _strerror(e: QcowError) -> str:
    """The errno text QEMU's qcow2 code would have returned for this failure."""
    if isinstance(e, RefcountOverflow):
        return "Invalid argument"
    if isinstance(e, CorruptTable):
        return e.strerror
    if isinstance(e, CorruptImage):
        return "Input/output error"
    return str(e)


def run_snapshot(filename: str, action: str | None, name: str | None, force_share: bool = False,
                 echo: Callable[[str], None] = print) -> None:
    """``action``: "l" list, "c" create, "a" apply, "d" delete, None nothing (qemu-img opens the
    image and does nothing, successfully)."""
    writable = action in ("c", "a", "d")
    with key_errors_name(filename):
        dev = open_image(filename, "r+" if writable else "r", None, backing=False,
                         force_share=force_share and not writable)
    try:
        if action == "l":
            rows = snapshot_rows(dev)
            if rows:
                echo("Snapshot list:\n" + snapshot_header() + "\n" + "".join(snapshot_line(r) + "\n" for r in rows))
            return
        if action is None:
            return
        if not dev.supports_snapshots:  # raw: no internal snapshots
            what = {"c": "create", "a": "apply", "d": "delete"}[action]
            if action == "c":
                raise SnapshotError(f"Could not create snapshot '{name}': -95 (Operation not supported)")
            raise SnapshotError(f"Could not {what} snapshot '{name}': " + (
                "snapshot not found" if action == "d" else "Block driver does not support snapshots"))
        if action == "a" and dev.bitmaps():  # QEMU's bdrv_snapshot_goto, before it looks for the snapshot
            raise SnapshotError(f"Could not apply snapshot '{name}': Device has active dirty bitmaps")
        try:
            if action == "c":
                dev.snapshot_create(name or "")
            elif action == "a":
                dev.snapshot_apply(name or "")
            else:
                dev.snapshot_delete(name or "")
        except SnapshotNotFound:
            if action == "a":
                raise SnapshotError(f"Could not apply snapshot '{name}': Failed to load snapshot: "
                                    "No such file or directory") from None
            raise SnapshotError(f"Could not delete snapshot '{name}': snapshot not found") from None
        except QcowError as e:
            verb = {"c": "create", "a": "apply", "d": "delete"}[action]
            report = getattr(e, "report", None)  # a line the driver printed first (rbd)
            if action == "a":  # bdrv_snapshot_goto reports the driver's errno
                e = f"Failed to load snapshot: {_strerror(e)}"
            raise SnapshotError((f"{report}\n" if report else "") + f"Could not {verb} snapshot '{name}': {e}") \
                from None
    finally:
        dev.close()
