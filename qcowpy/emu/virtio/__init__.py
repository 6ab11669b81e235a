"""virtio-pci: the modern PCI transport over the shared engine in :mod:`qcowpy.virtio`."""
from __future__ import annotations
