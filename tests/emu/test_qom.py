"""QOM: registration, class and instance initialisation order, casts, interfaces, properties, paths."""
from __future__ import annotations

import pytest

from qcowpy.emu.errors import EmuError, PathNotFound, PropertyError, TypeCastError, TypeNotFound
from qcowpy.emu.qom import (TYPE_CONTAINER, TYPE_INTERFACE, Object, ObjectClass, ObjectProperty, TypeInfo,
                            TypeRegistry, attr_property, object_cast, object_dynamic_cast, object_resolve_path,
                            parse_size)


@pytest.fixture
def reg():
    r = TypeRegistry()
    r.register(TypeInfo("object", parent=None, abstract=True))
    r.register(TypeInfo(TYPE_INTERFACE, parent=None, abstract=True))
    r.register(TypeInfo(TYPE_CONTAINER))
    return r


class AnimalClass(ObjectClass):
    sound: str
    legs: int


class Animal(Object):
    log: list


def test_class_init_runs_once_parent_first_and_inherits(reg):
    calls = []

    def animal_ci(k, data):
        calls.append(("animal", data))
        k.sound, k.legs = "...", 4

    def dog_ci(k, data):
        calls.append(("dog", data))
        assert k.legs == 4  # inherited from the parent's class_init
        k.sound = "woof"

    reg.register(TypeInfo("animal", class_type=AnimalClass, instance_type=Animal, class_init=animal_ci,
                          class_data=1, abstract=True))
    reg.register(TypeInfo("dog", parent="animal", class_init=dog_ci, class_data=2))
    dog = reg.class_of("dog")
    animal = reg.class_of("animal")
    assert calls == [("animal", 1), ("dog", 2)]
    assert (dog.sound, animal.sound) == ("woof", "...")
    reg.class_of("dog")
    assert len(calls) == 2
    assert isinstance(dog, AnimalClass)


def test_instance_init_order_and_post_init(reg):
    def a_init(o):
        o.log = ["animal"]

    reg.register(TypeInfo("animal", instance_type=Animal, instance_init=a_init,
                          instance_post_init=lambda o: o.log.append("animal-post")))
    reg.register(TypeInfo("dog", parent="animal", instance_init=lambda o: o.log.append("dog"),
                          instance_post_init=lambda o: o.log.append("dog-post")))
    d = reg.new("dog")
    assert d.log == ["animal", "dog", "dog-post", "animal-post"]
    assert type(d) is Animal and d.typename == "dog"


def test_abstract_unknown_and_duplicate_types(reg):
    reg.register(TypeInfo("animal", abstract=True))
    with pytest.raises(EmuError, match="abstract"):
        reg.new("animal")
    with pytest.raises(TypeNotFound):
        reg.new("unicorn")
    with pytest.raises(EmuError, match="already registered"):
        reg.register(TypeInfo("animal"))


def test_instance_type_must_derive_from_parents(reg):
    class Other(Object):
        pass

    reg.register(TypeInfo("animal", instance_type=Animal))
    reg.register(TypeInfo("rock", parent="animal", instance_type=Other))
    with pytest.raises(EmuError, match="instance_type"):
        reg.new("rock")


def test_casts_and_interfaces(reg):
    reg.register(TypeInfo("pet-iface", parent=TYPE_INTERFACE, abstract=True))
    reg.register(TypeInfo("animal"))
    reg.register(TypeInfo("dog", parent="animal", interfaces=("pet-iface",)))
    reg.register(TypeInfo("puppy", parent="dog"))
    reg.register(TypeInfo("cat", parent="animal"))
    puppy, cat = reg.new("puppy"), reg.new("cat")
    assert object_dynamic_cast(puppy, "animal") is puppy
    assert object_dynamic_cast(puppy, "pet-iface") is puppy  # inherited interface
    assert object_dynamic_cast(cat, "pet-iface") is None
    assert object_dynamic_cast(cat, "dog") is None
    with pytest.raises(TypeCastError):
        object_cast(cat, "dog")
    assert [k.name for k in reg.classes("pet-iface")] == ["dog", "puppy"]
    reg.register(TypeInfo("bad", interfaces=("animal",)))
    with pytest.raises(EmuError, match="not an interface"):
        reg.class_of("bad")


def test_typed_properties_parse_like_the_command_line(reg):
    reg.register(TypeInfo("thing", instance_init=lambda o: o.__dict__.update(on=False, n=0, sz=0, name="")))
    t = reg.new("thing")
    t.add_property(attr_property("on", "bool", "on"))
    t.add_property(attr_property("n", "uint8", "n"))
    t.add_property(attr_property("sz", "size", "sz"))
    t.add_property(attr_property("name", "str", "name"))
    t.add_property(attr_property("ro", "uint8", "n", writable=False))
    t.set_property("on", "on")
    t.set_property("n", "0x7f")
    t.set_property("sz", "2M")
    t.set_property("name", "x")
    assert (t.on, t.n, t.sz, t.name) == (True, 127, 2 << 20, "x")
    t.set_property("on", "off")
    assert t.get_property("on") is False
    with pytest.raises(PropertyError, match="uint8"):
        t.set_property("n", "256")
    with pytest.raises(PropertyError, match="'on' or 'off'"):
        t.set_property("on", "maybe")
    with pytest.raises(PropertyError, match="not writable"):
        t.set_property("ro", 1)
    with pytest.raises(PropertyError, match="not found"):
        t.get_property("nope")
    assert [p.name for p in t.properties()][:2] == ["type", "on"]
    assert t.get_property("type") == "thing"


def test_class_properties_are_inherited(reg):
    def ci(k, _):
        k.add_property(ObjectProperty("color", "str", lambda o: "brown"))
    reg.register(TypeInfo("animal", class_init=ci))
    reg.register(TypeInfo("dog", parent="animal"))
    assert reg.new("dog").get_property("color") == "brown"


@pytest.mark.parametrize("text,value", [("1k", 1024), ("64M", 64 << 20), ("1.5G", 3 << 29), ("512", 512), (4096, 4096)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_default_suffix():
    assert parse_size("256", default_suffix="M") == 256 << 20


def test_composition_tree_paths(reg):
    reg.register(TypeInfo("animal"))
    root = reg.new(TYPE_CONTAINER)
    zoo = reg.new(TYPE_CONTAINER)
    root.add_child("zoo", zoo)
    a = reg.new("animal")
    name = zoo.add_child_auto("animal", a)
    b = reg.new("animal")
    assert zoo.add_child_auto("animal", b) == "animal[1]"
    assert name == "animal[0]"
    assert a.canonical_path() == "/zoo/animal[0]"
    assert object_resolve_path(root, "/zoo/animal[1]") is b
    assert zoo.get_property("animal[0]") == "/zoo/animal[0]"
    assert {p.name: p.type for p in zoo.properties()}["animal[1]"] == "child<animal>"
    with pytest.raises(PathNotFound):
        object_resolve_path(root, "/zoo/animal[2]")
    with pytest.raises(EmuError, match="already a child"):
        root.add_child("again", a)
    a.unparent()
    assert a.parent is None and "animal[0]" not in zoo.children()
