"""qcowpy's small PCI machine emulator, modelled on QEMU (QOM, memory API, PCI, qtest, monitor, QMP).

Typical use::

    from qcowpy.emu.machine import create_machine
    m = create_machine("mini-pc", "128M")
    m.device_add("a3dev-pci", id="a3")
"""
from __future__ import annotations

__all__ = ["create_machine"]


def create_machine(name=None, ram_size=None):  # type: ignore[no-untyped-def]
    """Build a machine (see :func:`qcowpy.emu.machine.create_machine`)."""
    from .machine import create_machine as _create
    return _create(name, ram_size)
