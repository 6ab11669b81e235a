"""Device models: the a3dev-pci teaching device and QEMU's edu device."""
from __future__ import annotations

from . import a3dev, edu  # noqa: F401  (importing registers the types)
