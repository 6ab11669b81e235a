"""The qcow2 engine: mapping, allocation, refcounts, metadata cache, codecs, creation."""
from typing import Any

__all__ = ["Qcow2Image", "Qcow2Options", "create_qcow2"]
_LAZY = {"Qcow2Image": "image", "Qcow2Options": "create", "create_qcow2": "create"}


def __getattr__(name: str) -> Any:
    """Submodules load on first use, so opening an image does not import creation code."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
