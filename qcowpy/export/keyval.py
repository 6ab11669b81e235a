"""QEMU's ``key=value,...`` option syntax (util/keyval.c) as the storage daemon's options use it.

Dotted keys nest (``file.filename=F`` -> ``{"file": {"filename": "F"}}``), ``,,`` is a literal
comma, and an option text starting with ``{`` is JSON instead. ``implied`` names the key of a
leading bare value (``--chardev socket,id=c`` -> ``backend=socket``).
"""
from __future__ import annotations

import json
from typing import Any, Optional

from ..block.spec import split_opts
from ..errors import QcowError


class OptionError(QcowError):
    """An option text that does not parse, or a parameter that is missing or wrong."""


def parse(text: str, implied: Optional[str] = None) -> dict[str, Any]:
    """The option text as a nested dict of strings (or JSON values)."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise OptionError(f"JSON parse error, {e.msg}") from None
        if not isinstance(value, dict):
            raise OptionError("JSON option must be an object")
        return value
    out: dict[str, Any] = {}
    for n, part in enumerate(split_opts(text)):
        if not part and n == 0 and text == "":
            break
        if "=" not in part:
            if n == 0 and implied is not None:
                key, value = implied, part
            else:
                raise OptionError(f"Expected '=' after parameter '{part}'")
        else:
            key, value = part.split("=", 1)
        if not key:
            raise OptionError("Invalid parameter ''")
        node = out
        *path, leaf = key.split(".")
        for p in path:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise OptionError(f"Parameter '{p}' used inconsistently")
            node = child
        if isinstance(node.get(leaf), dict):
            raise OptionError(f"Parameter '{key}' used inconsistently")
        node[leaf] = value
    return out


def take(opts: dict[str, Any], key: str, required: bool = False, default: Any = None) -> Any:
    """Remove and return ``opts[key]`` (QEMU: "Parameter 'x' is missing" when required)."""
    if key in opts:
        return opts.pop(key)
    if required:
        raise OptionError(f"Parameter '{key}' is missing")
    return default


def take_bool(opts: dict[str, Any], key: str, default: bool) -> bool:
    v = opts.pop(key, default)
    if isinstance(v, bool):
        return v
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")


def take_int(opts: dict[str, Any], key: str, default: int) -> int:
    v = opts.pop(key, default)
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    try:
        return int(str(v), 0)
    except ValueError:
        raise OptionError(f"Parameter '{key}' expects integer") from None


def no_more(opts: dict[str, Any], prefix: str = "") -> None:
    """QEMU's check that every parameter was used."""
    for k in opts:
        raise OptionError(f"Parameter '{prefix}{k}' is unexpected")
