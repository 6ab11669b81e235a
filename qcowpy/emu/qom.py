"""QOM-style object model: named types with parents, classes, interfaces and properties.

This is the part of QEMU the device tutorial teaches first, kept small enough to read in one
sitting. A type is described by a :class:`TypeInfo` and registered by name; its class object
(:class:`ObjectClass`) is built lazily from the parent's class and then handed to ``class_init``;
instances are made with :func:`object_new`, which runs every ``instance_init`` from the root type
down. Where QEMU uses C structs for state (``instance_size``) we use Python classes
(``instance_type``), and ``class_type`` plays the role of ``class_size``.

Objects form a composition tree through ``child<...>`` properties; :func:`object_resolve_path`
walks it, which is what ``qom-list``/``qom-get`` use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from .errors import PathNotFound, PropertyError, TypeCastError, TypeNotFound, EmuError

TYPE_OBJECT = "object"
TYPE_INTERFACE = "interface"
TYPE_CONTAINER = "container"


@dataclass
class TypeInfo:
    """Describes a type before registration (QEMU's ``TypeInfo``)."""

    name: str
    parent: Optional[str] = TYPE_OBJECT
    instance_type: Optional[type] = None
    class_type: Optional[type] = None
    instance_init: Optional[Callable[["Object"], None]] = None
    instance_post_init: Optional[Callable[["Object"], None]] = None
    instance_finalize: Optional[Callable[["Object"], None]] = None
    class_init: Optional[Callable[["ObjectClass", Any], None]] = None
    class_data: Any = None
    abstract: bool = False
    interfaces: tuple[str, ...] = ()


@dataclass
class ObjectProperty:
    """A named, typed accessor on an object or class (QEMU's ``ObjectProperty``).

    ``type`` is QEMU's property type string: ``bool``, ``uint8``..``uint64``, ``int``, ``size``,
    ``str``, ``child<T>`` or ``link<T>``. ``get``/``set`` receive the object.
    """

    name: str
    type: str
    get: Optional[Callable[["Object"], Any]] = None
    set: Optional[Callable[["Object", Any], None]] = None
    description: str = ""
    default: Any = None
    parse: Optional[Callable[[Any], Any]] = None  # string parser replacing the type's default one


class ObjectClass:
    """Per-type data shared by every instance; ``class_init`` fills it in."""

    def __init__(self) -> None:
        self.type: TypeImpl  # set by the registry
        self.properties: dict[str, ObjectProperty] = {}

    @property
    def name(self) -> str:
        return self.type.name

    def is_a(self, type_name: str) -> bool:
        return self.type.is_a(type_name)

    def add_property(self, prop: ObjectProperty) -> ObjectProperty:
        """Add a class property (QEMU's ``object_class_property_add``)."""
        if prop.name in self.properties:
            raise PropertyError(f"attempt to add duplicate property '{prop.name}' to class '{self.name}'")
        self.properties[prop.name] = prop
        return prop


class TypeImpl:
    """A registered type: its info, parent link and (once initialised) its class."""

    def __init__(self, registry: "TypeRegistry", info: TypeInfo) -> None:
        self.registry = registry
        self.info = info
        self.name = info.name
        self.klass: Optional[ObjectClass] = None
        self.interfaces: tuple[str, ...] = ()

    @property
    def parent(self) -> Optional["TypeImpl"]:
        return self.registry.lookup(self.info.parent) if self.info.parent else None

    @property
    def abstract(self) -> bool:
        return self.info.abstract

    def ancestry(self) -> list["TypeImpl"]:
        """This type and its ancestors, most derived first."""
        chain, t = [], self
        while t is not None:
            chain.append(t)
            t = t.parent
        return chain

    def is_a(self, type_name: str) -> bool:
        for t in self.ancestry():
            if t.name == type_name:
                return True
        self.registry.class_of(self.name)  # make sure interfaces are known
        return any(self.registry.lookup(i).is_a(type_name) for i in self.interfaces)


class TypeRegistry:
    """Types by name. One default registry holds the built-in types (types are code, not state)."""

    def __init__(self) -> None:
        self._types: dict[str, TypeImpl] = {}

    def register(self, info: TypeInfo) -> TypeImpl:
        if not info.name:
            raise EmuError("a type needs a name")
        if info.name in self._types:
            raise EmuError(f"type '{info.name}' is already registered")
        impl = TypeImpl(self, info)
        self._types[info.name] = impl
        return impl

    def lookup(self, name: str) -> TypeImpl:
        try:
            return self._types[name]
        except KeyError:
            raise TypeNotFound(f"type '{name}' not found") from None

    def exists(self, name: str) -> bool:
        return name in self._types

    def class_of(self, name: str) -> ObjectClass:
        """Build (once) and return the class of a type, like QEMU's ``type_initialize``."""
        impl = self.lookup(name)
        if impl.klass is not None:
            return impl.klass
        parent = impl.parent
        parent_klass = self.class_of(parent.name) if parent else None
        cls_type = impl.info.class_type or (type(parent_klass) if parent_klass else ObjectClass)
        if parent_klass is not None and not isinstance(parent_klass, ObjectClass):
            raise EmuError(f"bad parent class for '{name}'")
        if parent_klass is not None and not issubclass(cls_type, type(parent_klass)):
            raise EmuError(f"class_type of '{name}' must derive from its parent's class_type")
        klass = cls_type.__new__(cls_type)
        if parent_klass is not None:
            for key, value in vars(parent_klass).items():
                setattr(klass, key, value)
            klass.properties = dict(parent_klass.properties)
        else:
            ObjectClass.__init__(klass)
        klass.type = impl
        own = tuple(i for i in impl.info.interfaces if i not in (parent.interfaces if parent else ()))
        for iface in own:
            if not self.lookup(iface).is_a(TYPE_INTERFACE):
                raise EmuError(f"'{iface}' is not an interface type")
        impl.interfaces = (parent.interfaces if parent else ()) + own
        impl.klass = klass
        if impl.info.class_init is not None:
            impl.info.class_init(klass, impl.info.class_data)
        return klass

    def instance_type(self, impl: TypeImpl) -> type:
        for t in impl.ancestry():
            if t.info.instance_type is not None:
                return t.info.instance_type
        return Object

    def new(self, name: str) -> "Object":
        """Create an instance: run ``instance_init`` from the root type down, then post-inits."""
        impl = self.lookup(name)
        if impl.abstract:
            raise EmuError(f"object type '{name}' is abstract")
        klass = self.class_of(name)
        py_type = self.instance_type(impl)
        chain = impl.ancestry()
        for t in chain:
            if t.info.instance_type is not None and not issubclass(py_type, t.info.instance_type):
                raise EmuError(f"instance_type of '{name}' must derive from that of '{t.name}'")
        obj = py_type.__new__(py_type)
        Object._init_base(obj, klass)
        for t in reversed(chain):
            if t.info.instance_init is not None:
                t.info.instance_init(obj)
        for t in chain:
            if t.info.instance_post_init is not None:
                t.info.instance_post_init(obj)
        return obj

    def classes(self, implements: Optional[str] = None, include_abstract: bool = False) -> list[ObjectClass]:
        """Classes of all types that are (or implement) ``implements``, sorted by name."""
        out = []
        for name in sorted(self._types):
            impl = self._types[name]
            if impl.abstract and not include_abstract:
                continue
            if implements is None or impl.is_a(implements):
                out.append(self.class_of(name))
        return out


default_registry = TypeRegistry()


class Object:
    """Base of every instance. State lives in Python attributes of ``instance_type`` subclasses."""

    klass: ObjectClass
    parent: Optional["Object"]

    def _init_base(self, klass: ObjectClass) -> None:
        self.klass = klass
        self.parent = None
        self._properties: dict[str, ObjectProperty] = {}
        self._children: dict[str, Object] = {}

    @property
    def typename(self) -> str:
        return self.klass.name

    def is_a(self, type_name: str) -> bool:
        return self.klass.type.is_a(type_name)

    # -- properties -------------------------------------------------------------------------
    def add_property(self, prop: ObjectProperty) -> ObjectProperty:
        """Add an instance property (QEMU's ``object_property_add``)."""
        if prop.name in self._properties or prop.name in self.klass.properties:
            raise PropertyError(f"attempt to add duplicate property '{prop.name}' to object (type '{self.typename}')")
        self._properties[prop.name] = prop
        return prop

    def find_property(self, name: str) -> ObjectProperty:
        prop = self._properties.get(name) or self.klass.properties.get(name)
        if prop is None:
            raise PropertyError(f"Property '{self.typename}.{name}' not found")
        return prop

    def properties(self) -> list[ObjectProperty]:
        """Every property: the built-in ``type``, class properties, then instance ones."""
        props = [ObjectProperty("type", "string", lambda o: o.typename)]
        props += list(self.klass.properties.values())
        props += list(self._properties.values())
        return props

    def get_property(self, name: str) -> Any:
        if name == "type":
            return self.typename
        prop = self.find_property(name)
        if prop.get is None:
            raise PropertyError(f"Property '{self.typename}.{name}' is not readable")
        return prop.get(self)

    def set_property(self, name: str, value: Any) -> None:
        """Set a property from a Python value or a string as given on the command line."""
        prop = self.find_property(name)
        if prop.set is None:
            raise PropertyError(f"Property '{self.typename}.{name}' is not writable")
        prop.set(self, prop.parse(value) if prop.parse else convert_value(prop.type, value, name))

    # -- composition ------------------------------------------------------------------------
    def add_child(self, name: str, child: "Object") -> "Object":
        """Make ``child`` a composition child (QEMU's ``object_property_add_child``)."""
        if child.parent is not None:
            raise EmuError(f"object is already a child of {child.parent.canonical_path()}")
        if name in self._children or name in self._properties:
            raise PropertyError(f"attempt to add duplicate property '{name}' to object (type '{self.typename}')")
        self._children[name] = child
        child.parent = self
        self._properties[name] = ObjectProperty(
            name, f"child<{child.typename}>", lambda _o, c=child: c.canonical_path())
        return child

    def add_child_auto(self, prefix: str, child: "Object") -> str:
        """Add a child as ``prefix[N]`` with the first free N (QEMU's ``device[N]`` names)."""
        n = 0
        while f"{prefix}[{n}]" in self._children:
            n += 1
        name = f"{prefix}[{n}]"
        self.add_child(name, child)
        return name

    def del_child(self, name: str) -> "Object":
        child = self._children.pop(name)
        self._properties.pop(name, None)
        child.parent = None
        return child

    def unparent(self) -> None:
        """Detach this object from its composition parent."""
        if self.parent is not None:
            self.parent.del_child(self.name_in_parent())

    def children(self) -> dict[str, "Object"]:
        return dict(self._children)

    def child(self, name: str) -> "Object":
        try:
            return self._children[name]
        except KeyError:
            raise PathNotFound(f"'{name}' is not a child of {self.canonical_path()}") from None

    def name_in_parent(self) -> str:
        if self.parent is None:
            return ""
        for n, c in self.parent._children.items():
            if c is self:
                return n
        raise EmuError("broken composition tree")

    def root(self) -> "Object":
        o = self
        while o.parent is not None:
            o = o.parent
        return o

    def canonical_path(self) -> str:
        parts, o = [], self
        while o.parent is not None:
            parts.append(o.name_in_parent())
            o = o.parent
        return "/" + "/".join(reversed(parts))

    def __repr__(self) -> str:
        return f"<{self.typename} {self.canonical_path() if self.parent else '(unattached)'}>"


def _uint(bits: int) -> Callable[[Any, str], int]:
    def conv(v: Any, name: str) -> int:
        n = _int(v, name)
        if not 0 <= n < (1 << bits):
            raise PropertyError(f"Parameter '{name}' expects uint{bits}_t")
        return n
    return conv


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool):
        raise PropertyError(f"Parameter '{name}' expects integer")
    if isinstance(v, int):
        return v
    try:
        return int(str(v), 0)
    except ValueError:
        raise PropertyError(f"Parameter '{name}' expects integer") from None


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).lower()
    if s in ("on", "yes", "true", "y"):
        return True
    if s in ("off", "no", "false", "n"):
        return False
    raise PropertyError(f"Parameter '{name}' expects 'on' or 'off'")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE]?)[bB]?\s*$")
_SIZE_MULT = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(v: Any, name: str = "size", default_suffix: str = "") -> int:
    """Parse a size with QEMU's suffixes (k, M, G, T, P, E; binary multiples)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    m = _SIZE_RE.match(str(v))
    if not m:
        raise PropertyError(f"Parameter '{name}' expects a size")
    suffix = (m.group(2) or default_suffix).lower()
    value = float(m.group(1)) * _SIZE_MULT[suffix]
    if value != int(value):
        raise PropertyError(f"Parameter '{name}' expects a whole number of bytes")
    return int(value)


_CONVERTERS: dict[str, Callable[[Any, str], Any]] = {
    "bool": _bool, "uint8": _uint(8), "uint16": _uint(16), "uint32": _uint(32), "uint64": _uint(64),
    "int": _int, "int32": _int, "int64": _int, "size": parse_size,
    "str": lambda v, n: str(v), "string": lambda v, n: str(v),
}


def convert_value(prop_type: str, value: Any, name: str = "value") -> Any:
    """Convert a Python value or command-line string to a property's type."""
    conv = _CONVERTERS.get(prop_type)
    return conv(value, name) if conv else value


# -- QEMU-flavoured free functions, so code reads like the tutorial ------------------------------

def type_register_static(info: TypeInfo, registry: TypeRegistry = default_registry) -> TypeImpl:
    """Register a type (QEMU's ``type_register_static``)."""
    return registry.register(info)


def type_register_once(info: TypeInfo, registry: TypeRegistry = default_registry) -> TypeImpl:
    """Register a type unless a type of that name exists (lets modules be imported twice)."""
    if registry.exists(info.name):
        return registry.lookup(info.name)
    return registry.register(info)


def object_new(type_name: str, registry: TypeRegistry = default_registry) -> Object:
    """Create an instance of a registered, non-abstract type."""
    return registry.new(type_name)


def object_class_by_name(type_name: str, registry: TypeRegistry = default_registry) -> ObjectClass:
    return registry.class_of(type_name)


def object_class_get_list(implements: Optional[str] = None, include_abstract: bool = False,
                          registry: TypeRegistry = default_registry) -> list[ObjectClass]:
    return registry.classes(implements, include_abstract)


def object_dynamic_cast(obj: Optional[Object], type_name: str) -> Optional[Object]:
    """Return ``obj`` if it is a ``type_name`` (or implements that interface), else None."""
    if obj is not None and obj.is_a(type_name):
        return obj
    return None


def object_cast(obj: Object, type_name: str) -> Object:
    """A checked cast (QEMU's ``OBJECT_CHECK``): raise instead of returning a wrong type."""
    if object_dynamic_cast(obj, type_name) is None:
        raise TypeCastError(f"object {obj!r} is not an instance of type {type_name}")
    return obj


def object_resolve_path(root: Object, path: str) -> Object:
    """Resolve an absolute path like ``/machine/peripheral/dev0`` from ``root``."""
    if not path.startswith("/"):
        raise PathNotFound(f"Device '{path}' not found")
    obj = root
    for part in filter(None, path.split("/")):
        if part not in obj._children:
            raise PathNotFound(f"Device '{path}' not found")
        obj = obj._children[part]
    return obj


def walk(obj: Object) -> Iterable[tuple[int, str, Object]]:
    """Depth-first (depth, name, object) over the composition tree, children sorted by name."""
    def rec(o: Object, depth: int, name: str):
        yield depth, name, o
        for n in sorted(o._children):
            yield from rec(o._children[n], depth + 1, n)
    yield from rec(obj, 0, obj.name_in_parent() or "")


def attr_property(name: str, prop_type: str, attr: str, description: str = "",
                  writable: bool = True, default: Any = None) -> ObjectProperty:
    """A property backed by a plain attribute of the instance."""
    return ObjectProperty(
        name, prop_type, lambda o: getattr(o, attr),
        (lambda o, v: setattr(o, attr, v)) if writable else None, description, default)


def properties_help(type_name: str, skip: tuple[str, ...] = ()) -> str:
    """``TYPE options:`` and one line per settable property, in QEMU's ``object_property_help``
    layout: ``  name=<type>`` padded to 24 columns, `` - description``, `` (default: JSON)``."""
    import json
    obj = object_new(type_name)
    out = []
    for p in sorted(obj.properties(), key=lambda p: p.name):
        if p.name == "type" or p.name in skip or p.set is None:
            continue
        default = p.default if p.default is not None else p.get(obj) if p.get else None
        line = f"  {p.name}=<{p.type}>"
        if p.description or default is not None:
            line = f"{line:<24} - {p.description}"
        if default is not None:
            line += f" (default: {json.dumps(default)})"
        out.append(line)
    if not out:
        return f"There are no options for {type_name}.\n"
    return f"{type_name} options:\n" + "".join(line + "\n" for line in out)


def _register_base_types() -> None:
    type_register_once(TypeInfo(TYPE_OBJECT, parent=None, abstract=True))
    type_register_once(TypeInfo(TYPE_INTERFACE, parent=None, abstract=True))
    type_register_once(TypeInfo(TYPE_CONTAINER, parent=TYPE_OBJECT))


_register_base_types()
