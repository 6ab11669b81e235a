"""virtio: split virtqueues and virtio-blk (transport independent) and the modern PCI transport."""
from __future__ import annotations
