"""Machine types and board construction.

A machine type is a QOM type named ``NAME-machine`` derived from ``machine``; its class carries the
description, default RAM size and the ``init`` function that builds the board. ``mini-pc`` is a
minimal x86-style PC: RAM at 0, a PCI host bridge with config mechanism #1 on ports 0xCF8/0xCFC
and an ECAM window at 0xB0000000, PCI memory space behind RAM, a 64 KiB I/O space, four PCI
interrupt links routed to IRQs 10/10/11/11 and an MSI window at 0xFEE00000. ``a3-board`` shows how
to define a machine by subclassing: it changes the defaults and adds an on-board ``a3dev-pci``.
``a3-pc`` is the tutorial's machine: its bridge (:mod:`qcowpy.emu.hw.a3pc`) is PCI Express and
routes no INTx, and its class picks the ``a3acl`` accelerator by default.

Construction follows QEMU's phases: the machine object is made, its accelerator is configured
(which may register compat properties), the board is built, cold-plugged devices are added, and
:meth:`MachineState.creation_done` runs the machine-init-done notifiers once.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

from .accel import apply_compat_props, configure_accelerators, parse_accel_opt
from .clock import VirtualClock
from .errors import DeviceError, EmuError, PathNotFound, PropertyError
from .memory import SIZE_2_64, AddressSpace, MemoryRegion, MemoryRegionOps
from .mtree import mtree_info
from .pci.bus import PCIBus
from .pci.host import TYPE_PCI_HOST, TYPE_PCI_HOST_BRIDGE_FN, PCIHostState
from .qdev import DeviceState
from .qom import (TYPE_CONTAINER, TYPE_OBJECT, Object, ObjectClass, ObjectProperty, TypeInfo,
                  object_class_by_name, object_class_get_list, object_new, object_resolve_path,
                  parse_size, properties_help, type_register_once)
from . import hw  # noqa: F401  (registers the device types)
from .hw.a3pc import TYPE_A3PC_PCIE_HOST, A3PCPCIEHost
from .virtio import pci as _virtio_pci  # noqa: F401  (registers virtio-blk-pci)

TYPE_MACHINE = "machine"
MACHINE_SUFFIX = "-machine"

ECAM_BASE = 0xB000_0000
PCI_HOLE_START = 0xC000_0000
PCI_HOLE_END = 0xFEC0_0000
MSI_BASE = 0xFEE0_0000
MSI_SIZE = 0x10_0000
PIRQ_TO_IRQ = (10, 10, 11, 11)
NUM_IRQS = 24


class MachineClass(ObjectClass):
    """What ``-machine help`` lists and how the board is built."""

    desc: str
    alias: Optional[str]
    is_default: bool
    default_ram_size: int
    max_ram_size: int
    default_ram_id: str
    init: Callable[["MachineState"], None]
    has_pci: bool
    default_machine_opts: Optional[str]  # e.g. "accel=a3acl", applied before the user's -machine options
    intx_routed: bool  # False: the board's firmware tables tell the guest to use MSI/MSI-X

    @property
    def machine_name(self) -> str:
        return self.name[: -len(MACHINE_SUFFIX)]


class MachineState(Object):
    """A built machine: address spaces, PCI, interrupts, clock and the device tree under it."""

    klass: MachineClass
    ram_size: int
    system_memory: MemoryRegion
    system_io: MemoryRegion
    memory: AddressSpace
    io: AddressSpace
    address_spaces: list[AddressSpace]
    ram: Optional[MemoryRegion]
    pci_host: Optional[PCIHostState]
    pci_bus: Optional[PCIBus]
    clock: VirtualClock
    lock: threading.RLock
    irq_levels: list[bool]
    pirq_levels: list[bool]
    irq_listeners: list[Callable[[int, bool], None]]
    msi_log: list[tuple[int, int]]
    quit_requested: threading.Event
    boot_log: list[str]
    guest: Any  # the in-process guest after ``guest boot`` (qcowpy.emu.guest.system.GuestSystem)
    drives: dict[str, Any]
    accelerator: Any  # the AccelState (qcowpy.emu.accel) configured before the board was built
    compat_props: list[Any]  # GlobalProperty defaults for devices created from now on
    init_done_notifiers: list[Callable[["MachineState"], None]]
    ready: bool  # creation is done: notifiers have run, devices added now are hot-plugged
    warnings: list[str]  # every line reported on stderr, in order
    warn_sink: Optional[Callable[[str], None]]

    # -- phases and reports ------------------------------------------------------------------------
    def add_init_done_notifier(self, notify: Callable[["MachineState"], None]) -> None:
        """Run ``notify`` once the machine is complete (``qemu_add_machine_init_done_notifier``):
        after every cold-plugged device is realized, or at once if that moment has passed."""
        self.init_done_notifiers.append(notify)
        if self.ready:
            notify(self)

    def creation_done(self) -> None:
        """End of machine creation (``qdev_machine_creation_done``): notifiers run, once."""
        if self.ready:
            return
        self.ready = True
        for notify in list(self.init_done_notifiers):
            notify(self)

    def report(self, message: str) -> None:
        """A line QEMU prints on stderr and carries on after (``error_report``/``info_report``)."""
        self.warnings.append(message)
        if self.warn_sink is not None:
            self.warn_sink(message)

    def warn(self, message: str) -> None:
        """QEMU's ``warn_report``."""
        self.report("warning: " + message)

    def info(self, message: str) -> None:
        """QEMU's ``info_report``."""
        self.report(message)

    # -- drives ----------------------------------------------------------------------------------
    def drive_add(self, file: Optional[str] = None, format: Optional[str] = None, interface: str = "virtio",
                  id: Optional[str] = None, readonly: bool = False, serial: str = "",
                  spec: Optional[str] = None) -> Any:
        """Open an image as a drive (``-drive``); ``if=virtio`` also plugs a virtio-blk-pci for it.

        Either keyword arguments or a QEMU-style ``spec`` string (``file=...,format=...,if=...``)."""
        from .block import open_drive, parse_drive_spec
        if spec is not None:
            opts: dict[str, Any] = parse_drive_spec(spec)
        else:
            opts = {"file": file, "if": interface, "readonly": readonly, "serial": serial}
            if format is not None:
                opts["format"] = format
            if id is not None:
                opts["id"] = id
        with self.lock:
            default_id = f"{opts.get('if', 'virtio')}{len(self.drives)}"
            if opts.get("id") in self.drives:
                raise DeviceError(f"Duplicate ID '{opts['id']}' for drive")
            drive = open_drive(opts, default_id)
            self.drives[drive.id] = drive
            if drive.interface == "virtio":
                try:
                    self.device_add("virtio-blk-pci", {"drive": drive.id})
                except BaseException:
                    del self.drives[drive.id]
                    drive.close()
                    raise
            return drive

    def drive_del(self, drive_id: str) -> None:
        drive = self.drives.get(drive_id)
        if drive is None:
            raise DeviceError(f"Device '{drive_id}' not found")
        if drive.attached_to is not None:
            raise DeviceError(f"Drive '{drive_id}' is in use by a device")
        del self.drives[drive_id]
        drive.close()

    def shutdown(self) -> None:
        """Flush and close every drive (the images are clean afterwards)."""
        with self.lock:
            for drive in list(self.drives.values()):
                drive.close()
            self.drives.clear()

    def info_block(self) -> str:
        from .block import info_block
        return info_block(self.drives)

    # -- devices -------------------------------------------------------------------------------
    def device_add(self, driver: str, props: Optional[dict[str, Any]] = None, id: Optional[str] = None,
                   hotplug: bool = False) -> DeviceState:
        """Create, configure, plug and realize a device (``-device``/``device_add``)."""
        from .qom import default_registry
        if not default_registry.exists(driver):
            raise DeviceError(f"'{driver}' is not a valid device model name")
        klass = object_class_by_name(driver)
        if not klass.is_a("device") or klass.type.abstract:
            raise DeviceError(f"'{driver}' is not a valid device model name")
        if not getattr(klass, "user_creatable", False):
            raise DeviceError("Parameter 'driver' expects a pluggable device type")
        if hotplug and not getattr(klass, "hotpluggable", True):
            raise DeviceError(f"Device '{driver}' does not support hotplugging")
        if id is not None and id in self.child("peripheral").children():
            raise DeviceError(f"Duplicate device ID '{id}'")
        dev = self._new_device(driver, props)
        bus_type = getattr(klass, "bus_type", None)
        if bus_type == "PCI":
            if self.pci_bus is None:
                raise DeviceError(f"No 'PCI' bus found for device '{driver}'")
            bus = self.pci_bus
        else:
            raise DeviceError(f"Device '{driver}' cannot be plugged into machine '{self.klass.machine_name}'")
        dev.id = id
        dev.hotplugged = hotplug
        bus.attach(dev)
        try:
            dev.realize()
        except BaseException:
            bus.detach(dev)
            raise
        if id is not None:
            self.child("peripheral").add_child(id, dev)
        else:
            self.child("peripheral-anon").add_child_auto("device", dev)
        return dev

    def add_onboard(self, driver: str, props: Optional[dict[str, Any]] = None) -> DeviceState:
        """Add a built-in device under ``/machine/unattached`` (not user-removable)."""
        dev = self._new_device(driver, props)
        assert self.pci_bus is not None
        self.pci_bus.attach(dev)
        dev.realize()
        self.child("unattached").add_child_auto("device", dev)
        return dev

    def _new_device(self, driver: str, props: Optional[dict[str, Any]]) -> DeviceState:
        """A device with the accelerator's compat props applied first, then ``props``."""
        dev: DeviceState = object_new(driver)  # type: ignore[assignment]
        apply_compat_props(dev, self.compat_props)
        for key, value in (props or {}).items():
            dev.set_property(key, value)
        return dev

    def find_device(self, id_or_path: str) -> DeviceState:
        """A device by its ``id`` or its QOM path."""
        if id_or_path.startswith("/"):
            obj = object_resolve_path(self.root(), id_or_path)
        else:
            try:
                obj = self.child("peripheral").child(id_or_path)
            except PathNotFound:
                raise PathNotFound(f"Device '{id_or_path}' not found") from None
        if not isinstance(obj, DeviceState):
            raise PathNotFound(f"Device '{id_or_path}' not found")
        return obj

    def device_del(self, id_or_path: str) -> None:
        """Unplug a user-created device at once (QEMU waits for the guest; see docs)."""
        dev = self.find_device(id_or_path)
        if dev.parent is None or dev.parent.name_in_parent() not in ("peripheral", "peripheral-anon"):
            raise DeviceError(f"Device '{id_or_path}' is built in and cannot be unplugged")
        if not getattr(dev.klass, "hotpluggable", True):
            raise DeviceError(f"Device '{id_or_path}' does not support hot-unplug")
        dev.unrealize()
        if dev.parent_bus is not None:
            dev.parent_bus.detach(dev)
        dev.unparent()

    def devices(self) -> list[DeviceState]:
        return list(self.pci_bus.functions()) if self.pci_bus else []

    def system_reset(self) -> None:
        """Reset every device to its power-on state (RAM keeps its contents, as in QEMU)."""
        with self.lock:
            if self.pci_host is not None:
                self.pci_host.reset()

    # -- interrupts ----------------------------------------------------------------------------
    def set_pirq(self, pirq: int, level: bool) -> None:
        self.pirq_levels[pirq] = level
        irq = PIRQ_TO_IRQ[pirq]
        self.set_irq(irq, any(self.pirq_levels[p] for p, i in enumerate(PIRQ_TO_IRQ) if i == irq))

    def set_irq(self, irq: int, level: bool) -> None:
        if self.irq_levels[irq] != level:
            self.irq_levels[irq] = level
            for listener in list(self.irq_listeners):
                listener(irq, level)

    def _msi_write(self, addr: int, value: int, size: int) -> None:
        self.msi_log.append((MSI_BASE + addr, value))

    # -- reports -------------------------------------------------------------------------------
    def info_mtree(self, show_disabled: bool = False) -> str:
        return mtree_info(self.address_spaces, show_disabled)


def _machine_class_init(klass: ObjectClass, _data: Any) -> None:
    mc: MachineClass = klass  # type: ignore[assignment]
    mc.desc = ""
    mc.alias = None
    mc.is_default = False
    mc.default_ram_size = 128 << 20
    mc.max_ram_size = ECAM_BASE
    mc.default_ram_id = "pc.ram"
    mc.init = lambda m: None
    mc.has_pci = False
    mc.default_machine_opts = None
    mc.intx_routed = True


def _machine_instance_init(obj: Object) -> None:
    m: MachineState = obj  # type: ignore[assignment]
    m.ram_size = m.klass.default_ram_size
    m.ram = None
    m.pci_host = None
    m.pci_bus = None
    m.clock = VirtualClock()
    m.lock = threading.RLock()
    m.irq_levels = [False] * NUM_IRQS
    m.pirq_levels = [False] * 4
    m.irq_listeners = []
    m.msi_log = []
    m.quit_requested = threading.Event()
    m.boot_log = []
    m.guest = None
    m.drives = {}
    m.accelerator = None
    m.compat_props = []
    m.init_done_notifiers = []
    m.ready = False
    m.warnings = []
    m.warn_sink = None
    m.system_memory = MemoryRegion.container_region(m, "system", SIZE_2_64)
    m.system_io = MemoryRegion.container_region(m, "io", 0x10000)
    m.memory = AddressSpace(m.system_memory, "memory")
    m.io = AddressSpace(m.system_io, "I/O")
    m.address_spaces = [m.memory, m.io]
    m.add_property(ObjectProperty("memory-size", "size", lambda o: o.ram_size, None, "RAM size in bytes"))


type_register_once(TypeInfo(TYPE_MACHINE, parent=TYPE_OBJECT, instance_type=MachineState, class_type=MachineClass,
                            class_init=_machine_class_init, instance_init=_machine_instance_init, abstract=True))


# -- the mini-pc board ------------------------------------------------------------------------------

_MSI_OPS = MemoryRegionOps(read=lambda m, a, n: 0, write=lambda m, a, v, n: m._msi_write(a, v, n))


def _init_ram(m: MachineState) -> None:
    if m.ram_size > m.klass.max_ram_size:
        raise EmuError(f"ram size {m.ram_size:#x} is too large for machine '{m.klass.machine_name}' "
                       f"(at most {m.klass.max_ram_size >> 20} MiB)")
    if m.ram_size:
        m.ram = MemoryRegion.ram_region(m, m.klass.default_ram_id, m.ram_size)
        m.system_memory.add_subregion(0, m.ram)


def _map_host(m: MachineState, host: PCIHostState) -> None:
    """Map the bridge's config access (CF8/CFC, ECAM) and the MSI window; add function 00.0."""
    m.system_io.add_subregion(0xCF8, host.conf_mem)
    m.system_io.add_subregion(0xCFC, host.data_mem)
    m.system_memory.add_subregion(ECAM_BASE, host.mmcfg)
    m.system_memory.add_subregion(MSI_BASE, MemoryRegion.io_region(m, _MSI_OPS, m, "apic-msi", MSI_SIZE))
    m.pci_host = host
    m.pci_bus = host.bus
    m.add_onboard(TYPE_PCI_HOST_BRIDGE_FN, {"addr": "00.0"})


def mini_pc_init(m: MachineState) -> None:
    """Build the board: RAM, PCI memory behind it, ECAM, MSI window, host bridge, I/O ports."""
    _init_ram(m)
    pci_mem = MemoryRegion.container_region(m, "pci", SIZE_2_64)
    m.system_memory.add_subregion(0, pci_mem, priority=-1)
    host: PCIHostState = object_new(TYPE_PCI_HOST)  # type: ignore[assignment]
    m.add_child("pcihost", host)
    host.setup()
    bus = host.bus
    bus.clock = m.clock
    bus.machine = m
    bus.setup("pci.0", pci_mem, m.system_io, m.system_memory, 4,
              lambda dev, pin: (dev.slot - 1 + pin) & 3, m.set_pirq, m.address_spaces)
    host.realize()
    _map_host(m, host)


def _mini_pc_class_init(klass: ObjectClass, _data: Any) -> None:
    mc: MachineClass = klass  # type: ignore[assignment]
    mc.desc = "Minimal PC (PCI host bridge with CF8/CFC and ECAM, no CPU)"
    mc.is_default = True
    mc.init = mini_pc_init
    mc.has_pci = True


type_register_once(TypeInfo("mini-pc" + MACHINE_SUFFIX, parent=TYPE_MACHINE, class_init=_mini_pc_class_init))


# -- a machine defined by subclassing, as the tutorial does ----------------------------------------

def a3_board_init(m: MachineState) -> None:
    """Build a mini-pc, then solder an a3dev-pci into slot 3."""
    object_class_by_name("mini-pc" + MACHINE_SUFFIX).init(m)  # type: ignore[attr-defined]
    m.add_onboard("a3dev-pci", {"addr": "03.0"})


def _a3_board_class_init(klass: ObjectClass, _data: Any) -> None:
    mc: MachineClass = klass  # type: ignore[assignment]
    mc.desc = "mini-pc with an on-board a3dev-pci in slot 3 (subclass example)"
    mc.is_default = False
    mc.default_ram_size = 256 << 20
    mc.init = a3_board_init


type_register_once(TypeInfo("a3-board" + MACHINE_SUFFIX, parent="mini-pc" + MACHINE_SUFFIX,
                            class_init=_a3_board_class_init))


def _none_init(m: MachineState) -> None:
    if m.ram_size:
        m.ram = MemoryRegion.ram_region(m, "ram", m.ram_size)
        m.system_memory.add_subregion(0, m.ram)


def _none_class_init(klass: ObjectClass, _data: Any) -> None:
    mc: MachineClass = klass  # type: ignore[assignment]
    mc.desc = "empty machine"
    mc.default_ram_size = 0
    mc.init = _none_init


type_register_once(TypeInfo("none" + MACHINE_SUFFIX, parent=TYPE_MACHINE, class_init=_none_class_init))


# -- the tutorial's machine: a PCIe host bridge, accelerated by a3acl -----------------------------

def a3_pc_init(m: MachineState) -> None:
    """RAM, the a3-pc-pcie-host with its windows, ECAM and CF8/CFC, the MSI window, 00.0."""
    _init_ram(m)
    host: A3PCPCIEHost = object_new(TYPE_A3PC_PCIE_HOST)  # type: ignore[assignment]
    m.add_child("pcihost", host)
    host.setup_pcie(m.warn, m.system_memory, m.address_spaces)
    host.bus.clock = m.clock
    host.bus.machine = m
    host.realize()
    m.system_memory.add_subregion(0, host.pci_mem, priority=-1)
    m.system_io.add_subregion(0, host.pci_io, priority=-1)
    _map_host(m, host)
    m.add_init_done_notifier(_a3_pc_init_done)


def _a3_pc_init_done(m: MachineState) -> None:
    assert m.pci_bus is not None
    m.info(f"A3-PC: machine init done, {len(m.pci_bus.functions())} function(s) on {m.pci_bus.name}")


def _a3_pc_class_init(klass: ObjectClass, _data: Any) -> None:
    mc: MachineClass = klass  # type: ignore[assignment]
    mc.desc = "A3 tutorial PC (PCIe host bridge a3-pc-pcie-host, no INTx, accel a3acl)"
    mc.init = a3_pc_init
    mc.has_pci = True
    mc.default_machine_opts = "accel=a3acl"
    mc.intx_routed = False


type_register_once(TypeInfo("a3-pc" + MACHINE_SUFFIX, parent=TYPE_MACHINE, class_init=_a3_pc_class_init))


# -- registry helpers -------------------------------------------------------------------------------

def machine_classes() -> list[MachineClass]:
    """All concrete machine classes, sorted by name."""
    return [c for c in object_class_get_list(TYPE_MACHINE) if c.name.endswith(MACHINE_SUFFIX)]  # type: ignore[misc]


def find_machine_class(name: Optional[str]) -> MachineClass:
    classes = machine_classes()
    if name is None:
        for mc in classes:
            if mc.is_default:
                return mc
        raise EmuError("no default machine")
    for mc in classes:
        if mc.machine_name == name or mc.alias == name:
            return mc
    raise EmuError("unsupported machine type\nUse -machine help to list supported machines")


def machine_help() -> str:
    """The ``-machine help`` listing, in QEMU's layout."""
    lines = ["Supported machines are:"]
    for mc in machine_classes():
        if mc.alias:
            lines.append(f"{mc.alias:<20} {mc.desc} (alias of {mc.machine_name})")
        default = " (default)" if mc.is_default else ""
        lines.append(f"{mc.machine_name:<20} {mc.desc}{default}")
    return "\n".join(lines) + "\n"


def machine_class_help(mc: MachineClass) -> str:
    """``-machine TYPE,help``: the machine type's settable properties."""
    return properties_help(mc.name)


def _opts_accel(opts: Optional[str]) -> Optional[str]:
    """The ``accel=`` value of a machine option string, if any."""
    for part in (opts or "").split(","):
        key, _, value = part.partition("=")
        if key == "accel":
            return value
    return None


def create_machine(name: Optional[str] = None, ram_size: Any = None, accel: Sequence[str] = (),
                   machine_accel: Optional[str] = None, warn_sink: Optional[Callable[[str], None]] = None,
                   qtest_chardev: bool = False) -> MachineState:
    """Build a machine by type name (default machine when None) with an optional RAM size.

    ``accel`` are ``-accel`` option strings, ``machine_accel`` the ``-machine accel=A[:B]`` value;
    with neither, the class's ``default_machine_opts`` or qtest decide. ``warn_sink`` receives the
    messages QEMU prints and carries on after. The machine is not ``ready`` yet: add cold-plugged
    devices, then call :meth:`MachineState.creation_done`."""
    mc = find_machine_class(name)
    root = object_new(TYPE_CONTAINER)
    m: MachineState = object_new(mc.name)  # type: ignore[assignment]
    m.warn_sink = warn_sink
    root.add_child("machine", m)
    for sub in ("peripheral", "peripheral-anon", "unattached"):
        m.add_child(sub, object_new(TYPE_CONTAINER))
    if ram_size is not None:
        try:
            m.ram_size = parse_size(ram_size, "memory-size", default_suffix="M")
        except PropertyError:
            raise EmuError(f"Invalid RAM size '{ram_size}'") from None
    default_accel = _opts_accel(mc.default_machine_opts)
    configure_accelerators(m, [parse_accel_opt(a) for a in accel],
                           machine_accel if machine_accel is not None else default_accel,
                           lambda msg: m.report(msg), qtest_chardev)
    mc.init(m)
    return m
