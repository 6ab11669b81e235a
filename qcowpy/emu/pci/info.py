"""``query-pci`` data and the ``info pci`` text built from it, in QEMU's shapes."""
from __future__ import annotations

from typing import Any

from . import regs
from .bus import PCIBus
from .device import PCIDevice


def device_info(dev: PCIDevice) -> dict[str, Any]:
    """One ``PciDeviceInfo`` (QMP schema) for a function."""
    cls = dev.get_word(regs.CLASS_DEVICE)
    class_info: dict[str, Any] = {"class": cls}
    if cls in regs.CLASS_NAMES:
        class_info["desc"] = regs.CLASS_NAMES[cls]
    ident = {"vendor": dev.get_word(regs.VENDOR_ID), "device": dev.get_word(regs.DEVICE_ID)}
    if (dev.config[regs.HEADER_TYPE] & 0x7F) == regs.HEADER_TYPE_NORMAL:
        ident["subsystem-vendor"] = dev.get_word(regs.SUBSYSTEM_VENDOR_ID)
        ident["subsystem"] = dev.get_word(regs.SUBSYSTEM_ID)
    info: dict[str, Any] = {"bus": dev.bus.number if dev.bus else 0, "slot": dev.slot, "function": dev.function,
                            "class_info": class_info, "id": ident}
    pin = dev.config[regs.INTERRUPT_PIN]
    if pin:
        info["irq"] = dev.config[regs.INTERRUPT_LINE]
    info["irq_pin"] = pin
    info["qdev_id"] = dev.id or ""
    regions = []
    for n, r in enumerate(dev.io_regions):
        if r is None:
            continue
        addr = -1 if r.addr == regs.BAR_UNMAPPED else r.addr
        region: dict[str, Any] = {"bar": n, "address": addr, "size": r.size, "type": "io" if r.is_io else "memory"}
        if not r.is_io:
            region["prefetch"] = r.prefetch
            region["mem_type_64"] = r.is_64
        regions.append(region)
    info["regions"] = regions
    return info


def query_pci(bus: PCIBus) -> list[dict[str, Any]]:
    return [{"bus": bus.number, "devices": [device_info(d) for d in bus.functions()]}]


def format_info_pci(bus_infos: list[dict[str, Any]]) -> str:
    """The human ``info pci`` listing."""
    out: list[str] = []
    for bus in bus_infos:
        for d in bus["devices"]:
            out.append(f"  Bus {d['bus']:2d}, device {d['slot']:3d}, function {d['function']}:")
            ci = d["class_info"]
            name = ci.get("desc") or f"Class {ci['class']:04d}"
            out.append(f"    {name}: PCI device {d['id']['vendor']:04x}:{d['id']['device']:04x}")
            if "subsystem-vendor" in d["id"]:
                out.append(f"      PCI subsystem {d['id']['subsystem-vendor']:04x}:{d['id']['subsystem']:04x}")
            if "irq" in d:
                out.append(f"      IRQ {d['irq']}, pin {chr(ord('A') + d['irq_pin'] - 1)}")
            for r in d["regions"]:
                addr = r["address"] & ((1 << 64) - 1)
                last = (addr + r["size"] - 1) & ((1 << 64) - 1)
                if r["type"] == "io":
                    out.append(f"      BAR{r['bar']}: I/O at 0x{addr:04x} [0x{last:04x}].")
                else:
                    pf = " prefetchable" if r["prefetch"] else ""
                    bits = 64 if r["mem_type_64"] else 32
                    out.append(f"      BAR{r['bar']}: {bits} bit{pf} memory at 0x{addr:08x} [0x{last:08x}].")
            out.append(f"      id \"{d['qdev_id']}\"")
    return "\n".join(out) + "\n"
