"""Accelerators as QOM types, as QEMU's ``accel/accel-common.c`` and ``softmmu/vl.c`` have them.

An accelerator is a type named ``NAME-accel`` (QEMU's ``ACCEL_CLASS_NAME``) derived from ``accel``.
Its class carries a display ``name``, ``init_machine`` (returns 0 or a negative errno), the
``allowed`` flag that a successful init raises (QEMU's ``qtest_allowed``, ``kvm_allowed``, ...) and
``compat_props``: (type, property, value) defaults that every device created afterwards on that
machine receives before its own properties. Two are registered: ``qtest``, the CPU-less
accelerator this emulator really is, and ``a3acl``, the tutorial's.

:func:`configure_accelerators` follows ``configure_accelerators``/``do_configure_accelerator``:
``-accel`` options are tried in order; without them ``-machine accel=A:B`` (or the machine class's
``default_machine_opts``, or ``qtest``) gives the list. Unknown names are reported and skipped;
the first accelerator whose ``init_machine`` succeeds wins.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from .errors import EmuError
from .qom import (TYPE_OBJECT, Object, ObjectClass, TypeInfo, attr_property, default_registry,
                  object_class_by_name, object_class_get_list, object_new, type_register_once)

if TYPE_CHECKING:
    from .machine import MachineState

TYPE_ACCEL = "accel"
ACCEL_CLASS_SUFFIX = "-accel"
DEFAULT_ACCEL = "qtest"


def accel_class_name(name: str) -> str:
    """The QOM type name of accelerator ``name`` (QEMU's ``ACCEL_CLASS_NAME``)."""
    return name + ACCEL_CLASS_SUFFIX


@dataclass
class GlobalProperty:
    """A default for one property of every object of a type (QEMU's ``GlobalProperty``)."""

    driver: str
    property: str
    value: str


class AccelClass(ObjectClass):
    """What an accelerator type provides to the machine that selects it."""

    name_: str  # display name (QEMU's ``ac->name``); ``name`` is the QOM type name
    init_machine: Callable[["MachineState"], int]
    allowed: bool
    compat_props: list[GlobalProperty]

    @property
    def opt_name(self) -> str:
        """The name ``-accel`` takes: the type name without ``-accel``."""
        return self.name[: -len(ACCEL_CLASS_SUFFIX)]


class AccelState(Object):
    """The accelerator instance a machine runs with (``machine.accelerator``)."""

    klass: AccelClass


def _accel_class_init(klass: ObjectClass, _data: Any) -> None:
    ac: AccelClass = klass  # type: ignore[assignment]
    ac.name_ = ""
    ac.init_machine = lambda m: 0
    ac.allowed = False
    ac.compat_props = []


type_register_once(TypeInfo(TYPE_ACCEL, parent=TYPE_OBJECT, instance_type=AccelState, class_type=AccelClass,
                            class_init=_accel_class_init, abstract=True))


def accel_find(name: str) -> Optional[AccelClass]:
    """The class of accelerator ``name``, or None (QEMU's ``accel_find``)."""
    type_name = accel_class_name(name)
    if not default_registry.exists(type_name):
        return None
    klass = object_class_by_name(type_name)
    return klass if klass.is_a(TYPE_ACCEL) and not klass.type.abstract else None  # type: ignore[return-value]


def accel_help() -> str:
    """``-accel help``: every accelerator but qtest, which QEMU keeps for tests."""
    names = [c.name[: -len(ACCEL_CLASS_SUFFIX)] for c in object_class_get_list(TYPE_ACCEL)
             if c.name.endswith(ACCEL_CLASS_SUFFIX) and c.name != accel_class_name("qtest")]
    return "Accelerators supported in QEMU binary:\n" + "".join(n + "\n" for n in names)


def accel_init_machine(accel: AccelState, machine: "MachineState") -> int:
    """Attach ``accel`` and run its ``init_machine``; on success its compat props take effect."""
    ac = accel.klass
    machine.accelerator = accel
    ac.allowed = True
    ret = ac.init_machine(machine)
    if ret < 0:
        machine.accelerator = None
        ac.allowed = False
    else:
        machine.compat_props = machine.compat_props + list(ac.compat_props)
    return ret


def apply_compat_props(obj: Object, props: list[GlobalProperty]) -> None:
    """Give ``obj`` the defaults meant for its type (QEMU's ``object_apply_compat_props``)."""
    for g in props:
        if obj.is_a(g.driver):
            obj.set_property(g.property, g.value)


@dataclass
class AccelOpt:
    """One ``-accel NAME[,prop=value...]`` (``text`` is the option as given, for messages)."""

    name: str
    props: dict[str, str]
    text: Optional[str] = None


def parse_accel_opt(text: str) -> AccelOpt:
    """Split ``-accel NAME[,prop=value...]``; ``accel=NAME`` is the long spelling of the name."""
    name, props = "", {}
    for i, part in enumerate(p for p in text.split(",") if p):
        key, sep, value = part.partition("=")
        if i == 0 and not sep:
            name = key
        elif key == "accel":
            name = value
        else:
            props[key] = value if sep else "on"
    return AccelOpt(name, props, text)


def configure_accelerators(machine: "MachineState", accel_opts: list[AccelOpt], machine_accel: Optional[str],
                           warn: Callable[[str], None], qtest_chardev: bool = False) -> None:
    """Select the machine's accelerator as ``softmmu/vl.c`` does; ``warn`` gets the lines QEMU
    prints without stopping. Raises :class:`EmuError` when none can be used."""
    init_failed = False
    if not accel_opts:
        accelerators = DEFAULT_ACCEL if machine_accel is None else machine_accel
        for name in accelerators.split(":") if accelerators else []:
            if accel_find(name) is not None:
                accel_opts.append(AccelOpt(name, {}))
            else:
                init_failed = True
                warn(f"invalid accelerator {name}")
    elif machine_accel is not None:
        raise EmuError('The -accel and "-machine accel=" options are incompatible')
    for opt in accel_opts:
        where = f"-accel {opt.text}: " if opt.text is not None else ""
        ac = accel_find(opt.name)
        if ac is None:
            init_failed = True
            warn(f"{where}invalid accelerator {opt.name}")
            continue
        accel: AccelState = object_new(ac.name)  # type: ignore[assignment]
        for key, value in opt.props.items():
            try:
                accel.set_property(key, value)
            except EmuError as e:
                raise EmuError(f"{where}{e}") from None
        ret = accel_init_machine(accel, machine)
        if ret < 0:
            init_failed = True
            warn(f"failed to initialize {opt.name}: {os.strerror(-ret)}")
            continue
        if init_failed and not qtest_chardev:
            warn(f"falling back to {ac.name_}")
        return
    # with init_failed the reasons were reported already: QEMU exits 1 without another line
    raise EmuError("" if init_failed else "no accelerator found")


# -- qtest: no CPU, the guest is whoever speaks the qtest protocol --------------------------------

def _qtest_class_init(klass: ObjectClass, _data: Any) -> None:
    ac: AccelClass = klass  # type: ignore[assignment]
    ac.name_ = "QTest"
    ac.init_machine = lambda m: 0


type_register_once(TypeInfo(accel_class_name("qtest"), parent=TYPE_ACCEL, class_init=_qtest_class_init))


# -- a3acl: the tutorial's accelerator ------------------------------------------------------------

def a3acl_init_machine(machine: "MachineState") -> int:
    """Refuse boards without PCI (the tutorial's device needs a bus) unless ``pci-only=off``."""
    if machine.accelerator.pci_only and not machine.klass.has_pci:
        return -errno.ENODEV
    return 0


def _a3acl_instance_init(obj: Object) -> None:
    obj.pci_only = True  # type: ignore[attr-defined]


def _a3acl_class_init(klass: ObjectClass, _data: Any) -> None:
    ac: AccelClass = klass  # type: ignore[assignment]
    ac.name_ = "a3acl"
    ac.init_machine = a3acl_init_machine
    ac.add_property(attr_property("pci-only", "bool", "pci_only", "refuse machines without PCI", default=True))
    # no CPU to keep the rings busy: virtio queues default to 128 entries under a3acl
    ac.compat_props = [GlobalProperty("virtio-blk-pci", "queue-size", "128")]


type_register_once(TypeInfo(accel_class_name("a3acl"), parent=TYPE_ACCEL, class_init=_a3acl_class_init,
                            instance_init=_a3acl_instance_init))
