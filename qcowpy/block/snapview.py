"""Read an internal snapshot in place: qemu-img's ``convert -l`` / ``measure -l``.

QEMU's bdrv_snapshot_load_tmp: on an image opened read-only, the active L1 table is swapped for
the snapshot's, so every read sees the snapshot; nothing is written and the image's size stays.
"""
from __future__ import annotations

from ..errors import QcowError, SnapshotNotFound
from .device import BlockDevice


class SnapshotLoadError(QcowError):
    """The snapshot cannot be loaded (QEMU's message, without the "Failed to load snapshot: ")."""


def parse_snapshot_param(text: str) -> tuple[str | None, str | None]:
    """``-l snapshot.id=ID,snapshot.name=NAME`` -> (id, name); None when not in that form."""
    if not text.startswith("snapshot."):
        return None, None
    from .spec import split_opts
    sid = name = None
    for item in split_opts(text):
        key, eq, value = item.partition("=")
        if key == "snapshot.id" and eq:
            sid = value
        elif key == "snapshot.name" and eq:
            name = value
        else:  # qemu-img names the bad key, then gives up on the whole parameter
            raise SnapshotLoadError(f"Invalid parameter '{key}'\nFailed in parsing snapshot param '{text}'")
    return sid, name


def load_snapshot_tmp(dev: BlockDevice, snapshot_id: str | None, name: str | None) -> None:
    """Make ``dev`` (read-only qcow2) read the snapshot matching id and/or name."""
    if snapshot_id is None and name is None:
        raise SnapshotLoadError("snapshot_id and name are both NULL")
    if not dev.supports_snapshots:
        raise SnapshotLoadError(f"Block format '{dev.format}' used by device '' does not support temporarily "
                                "loading internal snapshots")
    if not dev.read_only:
        raise SnapshotLoadError("Device is not readonly")
    try:
        dev.snapshot_load_tmp(snapshot_id, name)
    except SnapshotNotFound:
        raise SnapshotLoadError("Can't find snapshot") from None


def load_snapshot_by_id_or_name(dev: BlockDevice, key: str) -> None:
    """An id match first, then a name match (bdrv_snapshot_load_tmp_by_id_or_name)."""
    try:
        load_snapshot_tmp(dev, key, None)
    except SnapshotLoadError as e:
        if str(e) != "Can't find snapshot":
            raise
        load_snapshot_tmp(dev, None, key)
