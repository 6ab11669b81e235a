"""Devices and buses on top of QOM (QEMU's qdev): realize/unrealize, reset, static properties.

A device is created unrealized, gets its properties set (from ``-device name,prop=value`` or
code), is plugged into a bus, then realized. Static properties (:class:`Property`) belong to the
class, are listed by ``-device NAME,help``, and can no longer be changed once the device is
realized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import DeviceError, PropertyError
from .qom import TYPE_OBJECT, Object, ObjectClass, ObjectProperty, TypeInfo, type_register_once

TYPE_DEVICE = "device"
TYPE_BUS = "bus"


@dataclass
class Property:
    """A static device property stored in attribute ``attr`` (QEMU's ``DEFINE_PROP_*``)."""

    name: str
    type: str
    attr: str
    default: Any = None
    description: str = ""
    parse: Optional[Callable[[Any], Any]] = None  # custom parser, e.g. PCI "addr"
    show: Optional[Callable[[Any], str]] = None  # custom formatter for info qtree


class DeviceClass(ObjectClass):
    """Class data of devices: realize hooks, static props and ``-device help`` metadata."""

    realize: Optional[Callable[["DeviceState"], None]]
    unrealize: Optional[Callable[["DeviceState"], None]]
    reset: Optional[Callable[["DeviceState"], None]]
    bus_realize: Optional[Callable[["DeviceState"], None]]
    bus_unrealize: Optional[Callable[["DeviceState"], None]]
    props: list[Property]
    desc: str
    bus_type: Optional[str]
    user_creatable: bool
    hotpluggable: bool
    category: str


class DeviceState(Object):
    """Base of all devices."""

    klass: DeviceClass
    realized: bool
    id: Optional[str]
    parent_bus: Optional["BusState"]
    hotplugged: bool
    child_buses: list["BusState"]

    @property
    def dc(self) -> DeviceClass:
        return self.klass

    def realize(self) -> None:
        """Realize the device: the bus hook (e.g. PCI registration) or the device's own hook."""
        if self.realized:
            return
        hook = self.klass.bus_realize or self.klass.realize
        if hook is not None:
            hook(self)
        self.realized = True

    def unrealize(self) -> None:
        if not self.realized:
            return
        for bus in list(self.child_buses):
            for child in list(bus.children):
                child.unrealize()
        hook = self.klass.bus_unrealize or self.klass.unrealize
        if hook is not None:
            hook(self)
        self.realized = False

    def reset(self) -> None:
        """Cold reset: this device, then everything on its buses."""
        if self.klass.reset is not None:
            self.klass.reset(self)
        for bus in self.child_buses:
            bus.reset()

    def static_props(self) -> list[Property]:
        return list(self.klass.props)


class BusState(Object):
    """A bus that devices plug into; it belongs to a parent device."""

    name: str
    children: list[DeviceState]
    parent_dev: Optional[DeviceState]

    def attach(self, dev: DeviceState) -> None:
        if dev.parent_bus is not None:
            raise DeviceError(f"device is already on bus '{dev.parent_bus.name}'")
        self.children.append(dev)
        dev.parent_bus = self

    def detach(self, dev: DeviceState) -> None:
        self.children.remove(dev)
        dev.parent_bus = None

    def reset(self) -> None:
        for dev in list(self.children):
            dev.reset()


def _device_class_init(klass: ObjectClass, _data: Any) -> None:
    dc: DeviceClass = klass  # type: ignore[assignment]
    dc.realize = dc.unrealize = dc.reset = None
    dc.bus_realize = dc.bus_unrealize = None
    dc.props = []
    dc.desc = ""
    dc.bus_type = None
    dc.user_creatable = True
    dc.hotpluggable = True
    dc.category = "misc"
    dc.add_property(ObjectProperty(
        "realized", "bool", lambda o: o.realized, _set_realized, "whether the device is realized"))


def _set_realized(dev: Object, value: Any) -> None:
    assert isinstance(dev, DeviceState)
    if value:
        dev.realize()
    else:
        dev.unrealize()


def _device_instance_init(obj: Object) -> None:
    dev: DeviceState = obj  # type: ignore[assignment]
    dev.realized = False
    dev.id = None
    dev.parent_bus = None
    dev.hotplugged = False
    dev.child_buses = []
    for p in dev.klass.props:
        setattr(dev, p.attr, p.default)


def device_class_set_props(dc: DeviceClass, props: list[Property]) -> None:
    """Add static properties to a device class (QEMU's ``device_class_set_props``)."""
    for p in props:
        dc.props = [q for q in dc.props if q.name != p.name] + [p]
        dc.properties[p.name] = ObjectProperty(
            p.name, p.type, (lambda o, a=p.attr: getattr(o, a)), _static_setter(p),
            p.description, p.default, p.parse)


def _static_setter(p: Property) -> Callable[[Object, Any], None]:
    def setter(obj: Object, value: Any) -> None:
        if getattr(obj, "realized", False):
            raise PropertyError(f"Attempt to set property '{p.name}' on device '{obj.typename}' after it was realized")
        setattr(obj, p.attr, value)
    return setter


def _bus_instance_init(obj: Object) -> None:
    bus: BusState = obj  # type: ignore[assignment]
    bus.name = ""
    bus.children = []
    bus.parent_dev = None


type_register_once(TypeInfo(TYPE_DEVICE, parent=TYPE_OBJECT, instance_type=DeviceState, class_type=DeviceClass,
                            class_init=_device_class_init, instance_init=_device_instance_init, abstract=True))
type_register_once(TypeInfo(TYPE_BUS, parent=TYPE_OBJECT, instance_type=BusState,
                            instance_init=_bus_instance_init, abstract=True))
