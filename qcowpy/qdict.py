"""The order QEMU prints a QDict in (its hash table of 512 buckets), shared by the tools' JSON
output and the block layer's ``json:`` node names (which QEMU prints the same way)."""
from __future__ import annotations

from typing import Any

_BUCKETS = 512
_M32 = 0xFFFFFFFF


def tdb_hash(name: str) -> int:
    data = name.encode("utf-8")
    value = (0x238F13AF * len(data)) & _M32
    for i, ch in enumerate(data):
        value = (value + (ch << (i * 5 % 24))) & _M32
    return (1103515243 * value + 12345) & _M32


def qdict_order(d: dict[str, Any]) -> dict[str, Any]:
    """The same items, in the order QEMU would print a QDict filled in ``d``'s insertion order."""
    items = list(d.items())
    indexed = [(tdb_hash(k) % _BUCKETS, -i, k, v) for i, (k, v) in enumerate(items)]
    indexed.sort(key=lambda t: (t[0], t[1]))
    return {k: v for _, _, k, v in indexed}
