"""``create``: qemu-img's bdrv_img_create flow (checks in QEMU's order, then the Formatting line)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..block.create import create_image, create_qcow2, qcow2_options, qcow2_size_fits
from ..block.open import open_image, resolve_backing_path
from ..errors import InvalidArgument, QcowError
from ..units import INT64_MAX
from ..crypto.secret import SECRETS
from .encrypt_opts import encrypt_spec, luks_create_options
from .options import ParsedOpts, parse_create_options, refcount_bits_error

_VERSIONS = {"v2": "0.10", "0.10": "0.10", "v3": "1.1", "1.1": "1.1"}
_PREALLOC = {"qcow2": ("off", "metadata", "falloc", "full"), "raw": ("off", "falloc", "full")}
#: formats whose image is the bare file: raw, and QEMU's file protocol named as a format (-f file)
_BARE = ("raw", "file")
#: formats without backing files
_NO_BACKING = _BARE + ("luks",)
#: every value QEMU's PreallocMode knows (a raw file refuses the others' meaning, not their name)
_PREALLOC_MODES = ("off", "metadata", "falloc", "full")


class _LateRefusal(InvalidArgument):
    """Refused by QEMU's file driver after it has created (emptied) the file."""


class CreateError(QcowError):
    """A create failure; ``hint`` is printed after the message without a prefix (as QEMU's hints)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


@dataclass
class CreateRequest:
    filename: str
    fmt: str = "raw"
    size: int | None = None
    options: str | None = None
    backing: str | None = None
    backing_fmt: str | None = None
    no_backing_open: bool = False  # -u
    shown_as: str | None = None  # the name as the user gave it (``file:x``), for the Formatting line


def prepare(req: CreateRequest) -> ParsedOpts:
    """Everything qemu-img checks before it prints the Formatting line."""
    opts = parse_create_options(req.fmt, req.options, req.filename)
    if "size" not in opts.values:
        if req.size is not None:
            opts.set("size", req.size)
    elif req.size is not None:
        raise InvalidArgument("The image size must be specified only once")
    if req.backing is not None:
        if req.fmt in _NO_BACKING:
            raise InvalidArgument(f"Backing file not supported for file format '{req.fmt}'")
        opts.set("backing_file", req.backing)
    if req.backing_fmt is not None:
        if req.fmt in _NO_BACKING:
            raise InvalidArgument(f"Backing file format not supported for file format '{req.fmt}'")
        opts.set("backing_fmt", req.backing_fmt)
    backing_file = opts.values.get("backing_file")
    if backing_file is not None:
        if backing_file == req.filename:
            raise InvalidArgument("Error: Trying to create an image with the same filename as the backing file")
        if backing_file == "":
            raise InvalidArgument("Expected backing file name, got empty string")
    backing_fmt = opts.values.get("backing_fmt")
    if backing_file and not req.no_backing_open:
        try:
            dev = open_image(resolve_backing_path(req.filename, str(backing_file)), "r",
                             str(backing_fmt) if backing_fmt else None, backing=False, no_io=True)
        except QcowError as e:
            raise CreateError(str(e), "Could not open backing image.\n") from None
        with dev:
            if not backing_fmt:
                raise CreateError("Backing file specified without backing format", f"Detected format of {dev.format}.")
            if "size" not in opts.values:
                opts.set("size", dev.size)
    elif backing_file and not backing_fmt:
        raise InvalidArgument("Backing file specified without backing format")
    if "size" not in opts.values:
        raise InvalidArgument("Image creation needs a size parameter")
    return opts


def validate(fmt: str, opts: ParsedOpts) -> dict:
    """The checks QEMU's format drivers make after the Formatting line; keyword options for create_image."""
    v = opts.values
    prealloc = str(v.get("preallocation", "off"))
    size = int(v["size"])  # type: ignore[call-overload]
    if int(v.get("extent_size_hint", 0)) > 0xFFFFFFFF:  # type: ignore[call-overload]
        raise InvalidArgument("Extent size hint is too large")  # the file driver's check, before the file
    hints = {k: v[k] for k in ("nocow", "extent_size_hint") if k in v}
    if fmt in _BARE:  # file-posix's words
        if prealloc not in _PREALLOC_MODES:
            raise InvalidArgument(f"invalid parameter value: {prealloc}")
        if prealloc not in _PREALLOC["raw"]:
            raise _LateRefusal(f"Unsupported preallocation mode: {prealloc}")
        out = {"preallocation": prealloc} if "preallocation" in v else {}
        out.update({k: v[k] for k in ("cluster_size", "password-secret") if k in v})  # rbd: object size, key
        return {**out, **hints}
    if fmt == "luks":
        return _validate_luks(v, prealloc, hints)
    compat = str(v.get("compat", "1.1"))
    if compat not in _VERSIONS:
        raise InvalidArgument(f"Parameter 'version' does not accept value '{compat}'")
    if prealloc not in _PREALLOC["qcow2"]:
        raise InvalidArgument(f"Parameter 'preallocation' does not accept value '{prealloc}'")
    ctype = str(v.get("compression_type", "zlib"))
    if ctype not in ("zlib", "zstd"):
        raise InvalidArgument(f"Parameter 'compression-type' does not accept value '{ctype}'")
    version = 2 if _VERSIONS[compat] == "0.10" else 3
    rounded = (size + 511) & ~511
    ext = bool(v.get("extended_l2", False))
    cs = int(v.get("cluster_size", 65536))  # type: ignore[call-overload]
    if ext and version < 3:
        raise InvalidArgument("Extended L2 entries are only supported with compatibility level 1.1 and above "
                              "(use version=v3 or greater)")
    if cs < 512 or cs > (2 << 20) or cs & (cs - 1):
        raise InvalidArgument("Cluster size must be a power of two between 512 and 2048k")
    if ext and cs < 16384:
        raise InvalidArgument("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes")
    if v.get("backing_file") and prealloc != "off" and not ext:
        raise InvalidArgument("Backing file and preallocation can only be used at the same time if extended_l2 is on")
    if v.get("backing_fmt") and not v.get("backing_file"):
        raise InvalidArgument("Backing format cannot be used without backing file")
    if version < 3 and v.get("lazy_refcounts"):
        raise InvalidArgument("Lazy refcounts only supported with compatibility level 1.1 and above "
                              "(use version=v3 or greater)")
    rb_error = refcount_bits_error(int(v.get("refcount_bits", 16)), version, "version=v3")  # type: ignore[call-overload]
    if rb_error:
        raise InvalidArgument(rb_error)
    if v.get("data_file_raw") and not v.get("data_file"):
        raise InvalidArgument("data-file-raw requires data-file")
    if v.get("data_file_raw") and v.get("backing_file"):
        raise InvalidArgument("Backing file and data-file-raw cannot be used at the same time")
    if v.get("data_file") and version < 3:
        raise InvalidArgument("External data files are only supported with compatibility level 1.1 and above "
                              "(use version=v3 or greater)")
    if version < 3 and ctype != "zlib":
        raise InvalidArgument("Non-zlib compression type is only supported with compatibility level 1.1 and above "
                              "(use version=v3 or greater)")
    spec = encrypt_spec(v)
    if rounded > INT64_MAX:
        raise InvalidArgument("Could not resize image: Image size cannot be negative")
    if not qcow2_size_fits(rounded, cs, ext):
        raise InvalidArgument("The image size is too large for file format 'qcow2' (try using a larger cluster size)")
    out: dict = {}
    for key in ("cluster_size", "compat", "refcount_bits", "compression_type", "lazy_refcounts", "extended_l2",
                "preallocation", "backing_file", "backing_fmt", "data_file", "data_file_raw"):
        if key in v:
            out[key] = v[key]
    if spec is not None:
        out["encrypt"] = spec
    out.update(hints)
    return out


def _validate_luks(v: dict, prealloc: str, hints: dict) -> dict:
    """block_crypto_co_create_opts_luks's checks; the secret is looked up only once the file
    exists (its failures then remove the file, as QEMU's do)."""
    if prealloc not in _PREALLOC_MODES:
        raise InvalidArgument(f"invalid parameter value: {prealloc}")
    luks = luks_create_options(v, prefix="")
    sid = v.get("key-secret")

    def password() -> bytes:
        if sid is None:
            raise InvalidArgument("Parameter 'key-secret' is required for cipher")
        return SECRETS.passphrase(str(sid))
    return {"luks": luks, "password": password, "preallocation": prealloc, **hints}


def run_create(req: CreateRequest, quiet: bool = False, echo: Callable[[str], None] = print,
               warn: Callable[[str], None] | None = None) -> None:
    """The whole ``qemu-img create``: checks, Formatting line, then the image."""
    opts = prepare(req)
    if not quiet:
        echo(opts.formatting_line(req.shown_as or req.filename))
    try:
        kwargs = validate(req.fmt, opts)
    except _LateRefusal:
        create_image(req.filename, 0, "raw")
        raise
    size = int(opts.values["size"])  # type: ignore[call-overload]
    if warn is not None and "extent_size_hint" in kwargs:  # only an explicit hint is worth a warning
        kwargs["warn"] = warn
    try:
        if req.fmt == "qcow2":
            # the checks above are qemu-img's; the backing file was opened (or -u given) already
            opts_ = qcow2_options(size, **kwargs)
            create_qcow2(req.filename, opts_)
        else:
            create_image(req.filename, size, "raw" if req.fmt == "file" else req.fmt, **kwargs)
    except QcowError as e:
        msg = str(e)
        prefix = f"Could not open '{req.filename}': "
        if msg.startswith(prefix):
            raise type(e)(f"Could not create '{req.filename}': " + msg[len(prefix):]) from None
        raise
