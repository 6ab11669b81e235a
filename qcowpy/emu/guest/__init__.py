"""The guest side, with no CPU: qtest access, PCI helpers, firmware and workloads.

Everything here talks to a :class:`qcowpy.emu.guest.qtest.QTest` endpoint, so the same code runs
against this emulator in-process, over the qtest socket, or against a real QEMU.
"""
