"""qemu-img's ``-o`` option strings: parsing (with ``,,`` escaping), typed values, help text.

The option lists mirror the order of QEMU's create option tables, because ``qemu-img create``
prints its ``Formatting ...`` line in that order: every option that was given or has a default,
sizes and numbers as decimal numbers, everything else as typed (strings with commas doubled).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument, UnsupportedFeature
from ..units import parse_option_size


@dataclass(frozen=True)
class OptDesc:
    name: str
    type: str  # "str", "bool", "size", "num"
    help: str
    default: str | None = None


_ENCRYPT = [  # QEMU's qcow2 create options for encryption (block/qcow2.c, crypto/block-luks.c)
    OptDesc("encryption", "onstr", "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    OptDesc("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
    OptDesc("encrypt.key-secret", "str", "ID of secret providing qcow AES key or LUKS passphrase"),
    OptDesc("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
    OptDesc("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
    OptDesc("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
    OptDesc("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
    OptDesc("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
    OptDesc("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
]
# the luks format's create options: qcow2's encrypt.* ones without the prefix, in QEMU's order
_LUKS_KEY = OptDesc("key-secret", "str", "ID of the secret that provides the keyslot passphrase")
_LUKS = [OptDesc("size", "size", "Virtual disk size"), _LUKS_KEY] + \
    [OptDesc(d.name[len("encrypt."):], d.type, d.help) for d in _ENCRYPT[3:]]
_QCOW2 = _ENCRYPT + [
    OptDesc("cluster_size", "size", "qcow2 cluster size", "65536"),
    OptDesc("extended_l2", "bool", "Extended L2 tables", "off"),
    OptDesc("preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    OptDesc("compression_type", "str", "Compression method used for image cluster compression", "zlib"),
    OptDesc("size", "size", "Virtual disk size"),
    OptDesc("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc("backing_file", "str", "File name of a base image"),
    OptDesc("backing_fmt", "str", "Image format of the base image"),
    OptDesc("data_file", "str", "File name of an external data file"),
    OptDesc("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    OptDesc("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    OptDesc("refcount_bits", "num", "Width of a reference count entry in bits", "16"),
]
_RAW = [
    OptDesc("size", "size", "Virtual disk size"),
    OptDesc("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
]
CREATE_OPTS = {"qcow2": _QCOW2, "raw": _RAW, "file": _RAW, "luks": _LUKS}  # -f file: the protocol as the format
# What a protocol driver adds to a format's list (QEMU appends the protocol's create options)
PROTOCOL_OPTS = {
    "rbd:": [OptDesc("size", "size", "Virtual disk size"), OptDesc("cluster_size", "size", "RBD object size"),
             OptDesc("password-secret", "str", "ID of secret providing the password")],
}


# What QEMU's file protocol adds for a local file (after the format's own options)
FILE_PROTOCOL_OPTS = [OptDesc("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)"),
                      OptDesc("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable")]


def create_opts(fmt: str, filename: str | None = None) -> list[OptDesc]:
    """The create options of ``fmt`` on the protocol ``filename`` names (a local file adds the file
    driver's ``nocow`` and ``extent_size_hint``; no filename, as in ``-o help``, adds nothing).
    raw's ``preallocation`` is the file protocol's option in QEMU, so another protocol drops it."""
    descs = list(CREATE_OPTS[fmt])
    protocol = False
    for prefix, extra in PROTOCOL_OPTS.items():
        if filename and filename.startswith(prefix):
            protocol = True
            if fmt == "raw":
                descs = [d for d in descs if d.name != "preallocation"]
            descs += [d for d in extra if d.name not in {x.name for x in descs}]
    if filename and not protocol and (filename.startswith("file:") or ":" not in filename.split("/", 1)[0]):
        descs += FILE_PROTOCOL_OPTS
        if fmt == "luks":  # the file driver's preallocation, in its place among the file's options
            descs.insert(-1, _RAW[1])
        if fmt in ("raw", "file"):  # raw's list is the file driver's own, in its order
            order = ("size", "nocow", "preallocation", "extent_size_hint")
            descs.sort(key=lambda d: order.index(d.name) if d.name in order else len(order))
    return descs

# Options QEMU has that qcowpy recognises but does not implement: a clear error, not "Invalid parameter".
_UNSUPPORTED: dict[str, str] = {}

_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


def valid_option_list(text: str) -> bool:
    """qemu-img rejects an empty list, a leading comma and an odd number of trailing commas."""
    if not text or text[0] == ",":
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def accumulate(texts: list[str] | tuple[str, ...]) -> str | None:
    """Join repeated ``-o`` arguments with commas, as qemu-img does (validating each)."""
    out = None
    for t in texts:
        if not valid_option_list(t):
            raise InvalidArgument(f"Invalid option list: {t}")
        out = t if out is None else f"{out},{t}"
    return out


def split_options(text: str) -> list[tuple[str, str]]:
    """``a=b,c=d,,e,flag,noflag`` -> [(a, b), (c, "d,e"), (flag, "on"), (flag, "off")]."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        name = text[i:j]
        if j >= n or text[j] == ",":
            if name in ("help", "?"):
                out.append((name, ""))
            elif name.startswith("no"):
                out.append((name[2:], "off"))
            else:
                out.append((name, "on"))
            i = j + 1
            continue
        j += 1
        value = []
        while j < n:
            if text[j] == ",":
                if j + 1 < n and text[j + 1] == ",":
                    value.append(",")
                    j += 2
                    continue
                break
            value.append(text[j])
            j += 1
        out.append((name, "".join(value)))
        i = j + 1
    return out


def has_help(text: str | None) -> bool:
    return bool(text) and any(name in ("help", "?") for name, _ in split_options(text))  # type: ignore[arg-type]


# Formats QEMU knows but cannot create (they have no create options): named so, not "unknown"
READ_ONLY_FORMATS = ("bochs", "cloop", "dmg", "vvfat")


def require_creatable(fmt: str) -> None:
    """qemu-img's refusal of a format it cannot create, in its words."""
    if fmt in READ_ONLY_FORMATS:
        raise InvalidArgument(f"Format driver '{fmt}' does not support image creation")
    if fmt not in CREATE_OPTS:
        raise InvalidArgument(f"Unknown file format '{fmt}'")


def help_text(fmt: str, filename: str | None) -> str:
    """What ``-o help`` prints (the options qcowpy implements for ``fmt``).

    With no filename raw lists only its own ``size``: its ``preallocation`` is the file
    protocol's option in QEMU, which a missing filename does not bring in."""
    require_creatable(fmt)
    descs = create_opts(fmt, filename)
    if fmt == "raw" and not filename:
        descs = [d for d in descs if d.name != "preallocation"]
    lines = ["Supported options:" if filename else f"Supported {fmt} options:"]
    lines += format_help_entries(descs)
    if not filename:
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    return "\n".join(lines) + "\n"


def format_help_entries(descs: list[OptDesc]) -> list[str]:
    """QEMU's qemu_opts_print_help lines, sorted by name."""
    entries = []
    for d in descs:
        kind = {"str": "str", "bool": "bool (on/off)", "onstr": "bool (on/off)", "size": "size", "num": "num"}[d.type]
        s = f"  {d.name}=<{kind}>"
        if len(s) < 24:
            s += " " * (24 - len(s))
        entries.append(f"{s} - {d.help}")
    return sorted(entries)


@dataclass
class ParsedOpts:
    """Options in QEMU's table order: ``raw`` keeps the typed text, ``values`` the parsed values."""

    fmt: str
    raw: dict[str, str]
    values: dict[str, object]
    filename: str | None = None  # where the image goes: a protocol there adds options

    def set(self, name: str, value: object, text: str | None = None) -> None:
        self.values[name] = value
        self.raw[name] = str(value) if text is None else text

    def formatting_line(self, filename: str) -> str:
        parts = []
        for d in create_opts(self.fmt, self.filename):
            if d.name in self.values:
                v = self.values[d.name]
                if d.type == "num" and isinstance(v, int) and v >= 1 << 63:
                    v -= 1 << 64  # QEMU prints numbers as int64 (so "-1" comes back as -1)
                text = str(v) if d.type in ("size", "num") else _escape(self.raw[d.name])
            elif d.default is not None:
                text = d.default
            else:
                continue
            parts.append(f"{d.name}={text}")
        return f"Formatting '{filename}', fmt={self.fmt} " + " ".join(parts)


def _escape(s: str) -> str:
    return s.replace(",", ",,")


def parse_create_options(fmt: str, text: str | None, filename: str | None = None) -> ParsedOpts:
    """Parse and type-check ``-o`` for ``fmt`` with qemu's messages (unknown names, bad values)."""
    require_creatable(fmt)
    by_name = {d.name: d for d in create_opts(fmt, filename)}
    parsed = ParsedOpts(fmt, {}, {}, filename)
    for name, value in split_options(text or ""):
        d = by_name.get(name)
        if d is None:
            if name in _UNSUPPORTED:
                raise UnsupportedFeature(f"{_UNSUPPORTED[name]} are not supported by qcowpy"
                                         if _UNSUPPORTED[name].endswith("s") else
                                         f"{_UNSUPPORTED[name]} is not supported by qcowpy")
            raise InvalidArgument(f"Invalid parameter '{name}'")
        parsed.raw[name] = value
        parsed.values[name] = typed_value(d, value)
    return parsed


def typed_value(d: OptDesc, value: str) -> object:
    if d.type == "bool":
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise InvalidArgument(f"Parameter '{d.name}' expects 'on' or 'off'")
    if d.type == "onstr":  # a QemuOpts bool the driver then reads as text ("encryption": only "on" means aes)
        if value not in _TRUE + _FALSE:
            raise InvalidArgument(f"Parameter '{d.name}' expects 'on' or 'off'")
        return value
    if d.type == "size":
        return parse_option_size(d.name, value)
    if d.type == "num":
        try:  # strtoull, as QEMU parses numbers: "-1" wraps to 2^64 - 1 (then fails range checks)
            v = int(value.strip(), 0)
        except ValueError:
            raise InvalidArgument(f"Parameter '{d.name}' expects a number") from None
        if not -(1 << 64) < v < (1 << 64):
            raise InvalidArgument(f"Value '{value}' is too large for parameter '{d.name}'")
        return v % (1 << 64)
    return value


def refcount_bits_error(bits: int, version: int, upgrade: str) -> str | None:
    """QEMU's refcount_bits checks; ``upgrade`` is the option its hint names ("version=v3" when
    creating, "compat=1.1" when measuring — QEMU words the two paths differently)."""
    if bits > 64 or bits < 1 or bits & (bits - 1):
        return "Refcount width must be a power of two and may not exceed 64 bits"
    if version < 3 and bits != 16:
        return ("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                f"(use {upgrade} or greater)")
    return None
