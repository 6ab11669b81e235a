"""JSON exactly as QEMU prints it.

QEMU's dictionaries (QDict) are hash tables of 512 buckets; printing walks the buckets in
order and, inside a bucket, the most recently inserted key first. The key order of
``qemu-img info --output=json`` is therefore a function of the key names (and of insertion
order only on a bucket collision). :func:`qdict_order` reproduces it; :func:`dumps_pretty`
reproduces QEMU's pretty printer (4-space indent, ``"key": value``, ``\\uXXXX`` escapes).
"""
from __future__ import annotations

from typing import Any

from ..qdict import qdict_order  # noqa: F401  (re-exported: the order lives below the block layer)


class QDict(dict):
    """A dict that prints in QDict order (insertion order is the QAPI schema's field order)."""


_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _quote(s: str) -> str:
    out = ['"']
    for ch in s:
        cp = ord(ch)
        esc = _SHORT_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif 0xDC80 <= cp <= 0xDCFF:  # undecodable byte (surrogateescape): QEMU prints U+FFFD
            out.append("\\uFFFD")
        elif cp > 0xFFFF:
            cp -= 0x10000
            out.append("\\u%04X\\u%04X" % (0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF)))
        elif cp < 0x20 or cp >= 0x7F:
            out.append("\\u%04X" % cp)
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def dumps_pretty(obj: Any) -> str:
    """QEMU's ``qobject_to_json_pretty``. Dicts of type :class:`QDict` are reordered like QEMU's."""
    parts: list[str] = []
    _emit(obj, 0, parts)
    return "".join(parts)


def _emit(obj: Any, depth: int, parts: list[str]) -> None:
    if isinstance(obj, bool):
        parts.append("true" if obj else "false")
    elif obj is None:
        parts.append("null")
    elif isinstance(obj, int):
        parts.append(str(obj))
    elif isinstance(obj, float):
        parts.append("%.17g" % obj)
    elif isinstance(obj, str):
        parts.append(_quote(obj))
    elif isinstance(obj, dict):
        items = qdict_order(obj) if isinstance(obj, QDict) else obj
        parts.append("{")
        first = True
        for k, v in items.items():
            parts.append("\n" + " " * (4 * (depth + 1)) if first else ",\n" + " " * (4 * (depth + 1)))
            first = False
            parts.append(_quote(k) + ": ")
            _emit(v, depth + 1, parts)
        parts.append("\n" + " " * (4 * depth) + "}")
    elif isinstance(obj, (list, tuple)):
        parts.append("[")
        first = True
        for v in obj:
            parts.append("\n" + " " * (4 * (depth + 1)) if first else ",\n" + " " * (4 * (depth + 1)))
            first = False
            _emit(v, depth + 1, parts)
        parts.append("\n" + " " * (4 * depth) + "]")
    else:
        raise TypeError(f"cannot print {type(obj).__name__} as JSON")
