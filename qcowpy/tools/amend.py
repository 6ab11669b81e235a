"""``amend``: qemu-img's img_amend over qcow2_amend_options (the order of checks and changes is
QEMU's: parse, validate in option order, upgrade, encryption, refcount width, data file fields
and a header update, backing check, lazy refcounts, size, downgrade).

Options are handled by name; ``AMEND_HANDLERS`` maps an option prefix (``encrypt.``) to the code
that amends it, so other parts of qcowpy (LUKS keyslots) register there without touching this
flow (``encrypt.*``: LUKS key slots).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from ..block.open import open_image
from ..format import constants as C
from ..qcow2 import amend as engine
from ..qcow2.resize import resize
from .options import CREATE_OPTS, OptDesc, format_help_entries, split_options, typed_value

_ENCRYPT = [
    OptDesc("encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"),
    OptDesc("encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"),
    OptDesc("encrypt.old-secret", "str", "Select all keyslots that match this password"),
    OptDesc("encrypt.new-secret", "str", "New secret to set in the matching keyslots. Empty string to erase"),
    OptDesc("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
]
# the create options qcow2 can also amend, described once (tools/options.py), in QEMU's order
_COMMON = [replace(next(d for d in CREATE_OPTS["qcow2"] if d.name == name), default=None)
           for name in ("size", "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw",
                        "lazy_refcounts", "refcount_bits")]
AMEND_OPTS = _ENCRYPT + _COMMON  # QEMU's qcow2_amend_opts, in its order
#: what each format can amend: the luks format's options are qcow2's encrypt.* ones unprefixed
AMEND_TABLES = {"qcow2": AMEND_OPTS, "luks": [replace(d, name=d.name[len("encrypt."):]) for d in _ENCRYPT]}


AmendError = engine.AmendError


@dataclass
class AmendContext:
    """What a registered handler gets: the open image, every option given, ``--force``."""

    image: object  # qcow2.image.Qcow2Image
    options: dict[str, object]
    force: bool
    status: Callable[[int, int], None] = field(default=lambda done, total: None)
    device: object = None  # the BlockDevice (LUKS's tools/encrypt_amend.amend_encryption takes it)


def _encrypt_check(img) -> None:
    """QEMU validates ``encrypt.*`` options in its option loop, before anything changes."""
    h = img.header
    if not h.crypt_method:
        raise AmendError("Can't amend encryption options - encryption not present")
    if h.crypt_method != C.CRYPT_LUKS:
        raise AmendError("Only LUKS encryption options can be amended")


def _encrypt_luks(ctx: AmendContext) -> None:
    """LUKS key slots (tools/encrypt_amend.py), after the version upgrade, as QEMU orders it."""
    from .encrypt_amend import amend_encryption
    amend_encryption(ctx.device, {k: v for k, v in ctx.options.items() if k.startswith("encrypt.")},  # type: ignore[arg-type]
                     ctx.force)


# option prefix -> the handler that applies those options
AMEND_HANDLERS: dict[str, Callable[[AmendContext], None]] = {"encrypt.": _encrypt_luks}


def amend_help(fmt: str = "qcow2") -> str:
    if fmt not in AMEND_TABLES:
        raise AmendError(f"Format driver '{fmt}' does not support option amendment")
    return f"Amend options for '{fmt}':\n" + "\n".join(format_help_entries(AMEND_TABLES[fmt])) + "\n"


def parse_amend_options(text: str, fmt: str = "qcow2") -> dict[str, object]:
    """Typed values of the ``-o`` options, refusing creation-only ones as qemu-img does."""
    by_name = {d.name: d for d in AMEND_TABLES[fmt]}
    create_names = {d.name for d in CREATE_OPTS[fmt]} | {"encryption", "encrypt.format", "encrypt.key-secret",
                                                              "encrypt.cipher-alg", "encrypt.cipher-mode",
                                                              "encrypt.ivgen-alg", "encrypt.ivgen-hash-alg",
                                                              "encrypt.hash-alg", "encrypt.slice-size"}
    out: dict[str, object] = {}
    for name, value in split_options(text):
        d = by_name.get(name)
        if d is None:
            hint = "This option is only supported for image creation\n" if name in create_names else None
            raise AmendError(f"Invalid parameter '{name}'", hint)
        out[name] = typed_value(d, value)
    return out


def _versions(compat: str) -> int:
    if compat in ("0.10", "v2"):
        return 2
    if compat in ("1.1", "v3"):
        return 3
    raise AmendError(f"Unknown compatibility level {compat}")


class _Progress:
    """QEMU's qcow2_amend_helper_cb: each operation's share projected over the ones to come."""

    def __init__(self, report: Callable[[float], None], total_ops: int):
        self.report, self.total = report, max(total_ops, 1)
        self.done_ops, self.offset_done, self.last_size, self.current = 0, 0, 0, None

    def start(self, op: str) -> Callable[[int, int], None]:
        def cb(offset: int, size: int) -> None:
            if self.current != op:
                if self.current is not None:
                    self.offset_done += self.last_size
                    self.done_ops += 1
                self.current = op
            self.last_size = size
            cur = self.offset_done + size
            projected = cur * (self.total - self.done_ops - 1) // (self.done_ops + 1)
            if cur + projected:
                self.report(100.0 * (self.offset_done + offset) / (cur + projected))
        return cb


def run_amend(filename: str, fmt: str | None, options: str, force: bool = False, cache: str = "writeback",
              report: Callable[[float], None] = lambda p: None) -> None:
    """The whole ``qemu-img amend`` after option syntax checks: open, validate, change."""
    with open_image(filename, "r+", fmt, cache=cache) as dev:
        amend_device(dev, options, force, report)


def amend_device(dev, options: str, force: bool = False, report: Callable[[float], None] = lambda p: None) -> None:
    """Amend an opened (read-write) device as ``qemu-img amend -o options`` does."""
    if dev.format not in AMEND_TABLES:
        raise AmendError(f"Format driver '{dev.format}' does not support option amendment")
    values = parse_amend_options(options, dev.format)
    if dev.format == "luks":  # key slots only (tools/encrypt_amend.py), options without a prefix
        from .encrypt_amend import amend_encryption
        report(0.0)
        amend_encryption(dev, values, force, prefix="")
        report(100.0)
    else:
        _amend(dev, values, force, report)
    dev.flush()


def _amend(dev, opts: dict[str, object], force: bool, report: Callable[[float], None]) -> None:
    img = dev.image
    h = img.header
    old_version = new_version = h.version
    refcount_bits = h.refcount_bits
    data_file_raw = bool(h.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW)
    lazy = bool(h.compatible_features & C.COMPAT_LAZY_REFCOUNTS)
    data_file = backing_file = backing_fmt = None
    new_size = 0
    handlers: list[str] = []
    for d in AMEND_OPTS:  # QEMU validates in the order of its option table
        if d.name not in opts:
            continue
        v = opts[d.name]
        if d.name == "compat":
            new_version = _versions(str(v))
        elif d.name == "size":
            new_size = int(v)  # type: ignore[call-overload]
        elif d.name == "backing_file":
            backing_file = str(v)
        elif d.name == "backing_fmt":
            backing_fmt = str(v)
        elif d.name.startswith("encrypt."):
            prefix = "encrypt."
            if prefix not in handlers:
                handlers.append(prefix)
                _encrypt_check(img)
        elif d.name == "lazy_refcounts":
            lazy = bool(v)
        elif d.name == "refcount_bits":
            refcount_bits = int(v)  # type: ignore[call-overload]
            if refcount_bits >= 1 << 63:
                refcount_bits -= 1 << 64
            msg = engine.refcount_width_error(refcount_bits)
            if msg:
                raise AmendError(msg)
        elif d.name == "data_file":
            data_file = str(v)
            if not img.external_data:
                raise AmendError("data-file can only be set for images that use an external data file")
        elif d.name == "data_file_raw":
            data_file_raw = bool(v)
            if data_file_raw and not h.autoclear_features & C.AUTOCLEAR_DATA_FILE_RAW:
                raise AmendError("data-file-raw cannot be set on existing images")
    progress = _Progress(report, (new_version != old_version) + (refcount_bits != h.refcount_bits) + len(handlers))
    report(0.0)
    if new_version > old_version:
        engine.upgrade(img, progress.start("upgrade"))
    for prefix in handlers:
        AMEND_HANDLERS[prefix](AmendContext(img, opts, force, progress.start(prefix), dev))
    if refcount_bits != h.refcount_bits:
        if new_version < 3 and refcount_bits != 16:
            raise AmendError("Refcount widths other than 16 bits require compatibility level 1.1 or above "
                             "(use compat=1.1 or greater)")
        engine.change_refcount_order(img, refcount_bits.bit_length() - 1, progress.start("refcount"))
    engine.set_data_file(img, data_file, data_file_raw)
    if backing_file is not None or backing_fmt is not None:
        if backing_file != (h.backing_file or None) or backing_fmt != h.backing_format:
            raise AmendError("Cannot amend the backing file", "You can use 'qemu-img rebase' instead.\n")
    engine.set_lazy_refcounts(img, lazy, new_version)
    if new_size:
        resize(img, (new_size + 511) & ~511 if new_size % 512 else new_size)
    if new_version < old_version:
        engine.downgrade(img, progress.start("downgrade"))
    report(100.0)


__all__ = ["AMEND_HANDLERS", "AMEND_OPTS", "AmendContext", "AmendError", "amend_help", "amend_device",
           "parse_amend_options", "run_amend"]
