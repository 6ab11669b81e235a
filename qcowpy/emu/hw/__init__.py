"""Device models: the a3dev-pci teaching device, QEMU's edu device, the a3-pc PCIe host bridge."""
from __future__ import annotations

from . import a3dev, a3pc, edu  # noqa: F401  (importing registers the types)
