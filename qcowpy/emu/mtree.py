"""The monitor's ``info mtree`` text (with ``-f``, the flat views), worded as QEMU prints it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .memory import AddressSpace, MemoryRegion


def _mtree_region(mr: MemoryRegion, level: int, base: int, alias_queue: list[MemoryRegion],
                  lines: list[str], show_disabled: bool) -> None:
    start = base + mr.addr
    end = (start + mr.size - 1) if mr.size else start
    indent = "  " * level
    disabled = "" if mr.enabled else " [disabled]"
    if mr.alias_of is not None:
        if not any(a is mr.alias_of for a in alias_queue):
            alias_queue.append(mr.alias_of)
        if mr.enabled or show_disabled:
            lines.append(f"{indent}{start:016x}-{end:016x} (prio {mr.priority}, {mr.type_name}): alias {mr.name} "
                         f"@{mr.alias_of.name} {mr.alias_offset:016x}-{mr.alias_offset + mr.size - 1:016x}{disabled}")
    elif mr.enabled or show_disabled:
        lines.append(f"{indent}{start:016x}-{end:016x} (prio {mr.priority}, {mr.type_name}): {mr.name}{disabled}")
    # QEMU prints children by address, and by descending priority at equal addresses.
    ordered: list[MemoryRegion] = []
    for sub in mr.subregions:
        for i, other in enumerate(ordered):
            if sub.addr < other.addr or (sub.addr == other.addr and sub.priority > other.priority):
                ordered.insert(i, sub)
                break
        else:
            ordered.append(sub)
    for sub in ordered:
        _mtree_region(sub, level + 1, start, alias_queue, lines, show_disabled)


def mtree_info(address_spaces: Iterable[AddressSpace], show_disabled: bool = False) -> str:
    """Text of ``info mtree``: each address space's tree, then every aliased region."""
    lines: list[str] = []
    alias_queue: list[MemoryRegion] = []
    groups: list[tuple[MemoryRegion, list[str]]] = []
    for as_ in address_spaces:
        for root, names in groups:
            if root is as_.root:
                names.append(as_.name)
                break
        else:
            groups.append((as_.root, [as_.name]))
    for root, names in groups:
        for name in sorted(names):
            lines.append(f"address-space: {name}")
        _mtree_region(root, 1, 0, alias_queue, lines, show_disabled)
        lines.append("")
    i = 0
    while i < len(alias_queue):
        mr = alias_queue[i]
        lines.append(f"memory-region: {mr.name}")
        _mtree_region(mr, 1, 0, alias_queue, lines, show_disabled)
        lines.append("")
        i += 1
    return "\n".join(lines) + "\n"


def mtree_flatview(as_: AddressSpace) -> str:
    """Text of ``info mtree -f`` for one address space."""
    lines = ['FlatView', f' AS "{as_.name}", root: {as_.root.name}']
    for r in as_.flatview.ranges:
        ro = " rom" if r.readonly else ""
        kind = "ram" if r.mr.ram is not None else "i/o"
        off = f" @{r.offset:016x}" if r.offset else ""
        lines.append(f"  {r.start:016x}-{r.end - 1:016x} (prio {r.mr.priority}, {kind}{ro}): {r.mr.name}{off}")
    if not as_.flatview.ranges:
        lines.append("  No rendered FlatView")
    return "\n".join(lines) + "\n"
