"""What every CLI command module shares: the program name, failure exits and message lines.

Kept apart from main.py (which registers the commands) so command modules import it without
importing main, and main imports them without a cycle.
"""
from __future__ import annotations

import os
import sys
import warnings

from ..crypto.secret import ATTACHED, SECRETS, load_secret
from ..errors import QcowError, is_hint
from ..units import cvtnum

CONTEXT = {"help_option_names": ["-h", "--help"]}

PROG = "qcowpy"


def set_prog_from_argv0(argv0: str) -> str:
    """Take the message prefix from the program's name, as QEMU does: a ``qemu-img`` symlink
    to qcowpy prints ``qemu-img:``, so scripts and QEMU's reference outputs see the same lines.
    ``python -m`` runs (argv[0] is a .py file) keep ``qcowpy``."""
    global PROG
    name = os.path.basename(argv0 or "")
    PROG = "qcowpy" if not name or name.endswith(".py") or name == "-c" else name
    return PROG


class CommandFailed(Exception):
    """Raised inside a command to exit with ``code`` after printing ``message`` (if any)."""

    def __init__(self, message: str | None, code: int = 1, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.hint = hint


#: names the tools opened -> the argument the user gave (an --image-opts string or json: filename)
_SHOWN_AS: dict[str, str] = {}
#: the json: name QEMU gives a file opened through a spec with key options (info's "image:")
NODE_NAMES: dict[str, str] = {}


_SAVED_LOCKING: list[str | None] = []  # QCOWPY_LOCKING before a file.locking=off argument set it


def reset_names() -> None:
    """Forget the previous command's argument names and locking override (main() runs many
    commands in one process in tests)."""
    _SHOWN_AS.clear()
    NODE_NAMES.clear()
    SECRETS.clear()
    ATTACHED.clear()
    while _SAVED_LOCKING:
        old = _SAVED_LOCKING.pop()
        if old is None:
            os.environ.pop("QCOWPY_LOCKING", None)
        else:
            os.environ["QCOWPY_LOCKING"] = old


def _locking_off(opts: dict) -> None:
    """``file.locking=off`` in a spec: this command takes no image locks (qcowpy/lock.py)."""
    child = opts.get("file")
    if isinstance(child, dict) and str(child.get("locking", "")).lower() in ("off", "false"):
        _SAVED_LOCKING.append(os.environ.get("QCOWPY_LOCKING"))
        os.environ["QCOWPY_LOCKING"] = "off"


def error_line(message: str) -> None:
    for opened, given in _SHOWN_AS.items():  # qemu-img names the argument as given
        head = f"Could not open '{opened}'"
        if message.startswith(head):
            message = f"Could not open '{given}'" + message[len(head):]
            break
    for line in message.split("\n"):
        sys.stderr.write(f"{line}\n" if is_hint(line) else f"{PROG}: {line}\n")


def warn_line(message: str) -> None:
    sys.stderr.write(f"{PROG}: warning: {message}\n")


def out(text: str) -> None:
    sys.stdout.write(text)


def size_arg(name: str, text: str) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = cvtnum(name, text)
    for w in caught:
        warn_line(str(w.message))
    return value


def warn_if_probed_raw(filename: str, fmt: str | None) -> None:
    """QEMU's warning when an image it opens for writing was probed as raw (block 0 is guarded)."""
    if fmt is None and filename.startswith("rbd:"):  # an rbd image: probe it through librbd
        _warn_if_probed_raw_rbd(filename)
        return
    if fmt is not None or not os.path.isfile(filename):
        return
    from ..block.open import probe_format
    try:
        probed = probe_format(filename)
    except (OSError, QcowError):
        return
    if probed == "raw":
        _probed_raw_warning(filename)


def _warn_if_probed_raw_rbd(filename: str) -> None:
    from ..block.open import open_image
    try:
        with open_image(filename, "r", None, backing=False) as dev:
            if dev.format != "raw" or dev.loc.snapshot is not None:  # type: ignore[attr-defined]
                return  # a snapshot fails to open for writing before any probing
            name = dev.node_name  # type: ignore[attr-defined]  # QEMU names the rbd node
    except (OSError, QcowError):
        return
    _probed_raw_warning(name)


def _probed_raw_warning(name: str) -> None:
    sys.stderr.write(f"WARNING: Image format was not specified for '{name}' and probing guessed raw.\n"
                     "         Automatically detecting the format is dangerous for raw images, write "
                     "operations on block 0 will be restricted.\n"
                     "         Specify the 'raw' format explicitly to remove the restrictions.\n")


#: user-creatable object types qemu-img accepts with --object (qcowpy uses secrets, for encrypted
#: images, and TLS credentials in the NBD server; the rest are checked and ignored)
OBJECT_TYPES = ("secret", "secret_keyring", "throttle-group", "iothread", "tls-creds-anon", "tls-creds-psk",
                "tls-creds-x509", "tls-cipher-suites", "authz-simple", "authz-list", "authz-listfile", "authz-pam",
                "memory-backend-file", "memory-backend-ram", "memory-backend-memfd")


def parse_objects(objects: tuple[str, ...] | list[str]) -> dict[str, dict]:
    """``--object TYPE,id=ID,...`` (or ``qom-type=TYPE,...``, or JSON) by id, checked as qemu-img
    checks them, so scripts that pass secrets or throttle groups keep working."""
    import json
    from ..block.spec import parse_image_opts
    out: dict[str, dict] = {}
    for text in objects:
        if text.startswith("{"):
            try:
                opts = json.loads(text)
            except json.JSONDecodeError as e:
                raise CommandFailed(f"JSON parse error, {e.msg}") from None
        else:
            first, _, rest = text.partition(",")
            opts = parse_image_opts(rest if "=" not in first else text)
            if "=" not in first:
                opts["qom-type"] = first
        qom_type = opts.get("qom-type")
        if qom_type is None:
            raise CommandFailed("Parameter 'qom-type' is missing")
        if qom_type not in OBJECT_TYPES:
            raise CommandFailed(f"Parameter 'qom-type' does not accept value '{qom_type}'")
        if "id" not in opts:
            raise CommandFailed("Parameter 'id' is missing")
        if opts["id"] in out:
            raise CommandFailed(f"attempt to add duplicate property '{opts['id']}' to object (type 'container')")
        out[opts["id"]] = opts
        if qom_type == "secret":  # loaded now, as QEMU completes objects before anything opens
            try:
                SECRETS.add(opts["id"], load_secret(opts))
            except QcowError as e:
                raise CommandFailed(str(e)) from None
    return out


def image_name(name: str, image_opts: bool, fmt: str | None = None) -> tuple[str, str | None]:
    """(what to open, format) for a filename argument: with ``--image-opts`` it is an options
    string (``driver=qcow2,file.filename=x``), turned into the ``json:`` filename every tool
    opens; a spec that is only a format over a plain file becomes that file and format."""
    from ..block.spec import (file_protocol_path, is_json_filename, key_options, keyed_node_name, parse_image_opts,
                              parse_json_filename, plain_file)
    import json
    if image_opts:
        if fmt:
            raise CommandFailed("--image-opts and --format are mutually exclusive")
        opts = parse_image_opts(name)
    elif name.startswith("file:"):
        opened = file_protocol_path(name)
        _SHOWN_AS[opened] = name
        return opened, fmt
    elif is_json_filename(name):
        try:
            opts = parse_json_filename(name)
        except QcowError as e:
            raise CommandFailed(open_error(name, e)) from None
    else:
        return name, fmt
    _locking_off(opts)
    encrypt = key_options(opts, pop=True)
    simple = plain_file(opts)
    if encrypt is not None:
        if simple is None:  # the block layer's spec opener takes it from there
            opts.update({"key-secret": encrypt["key-secret"]} if opts.get("driver") == "luks" else {"encrypt": encrypt})
        else:
            ATTACHED.attach(simple[0], encrypt)
            if simple[1]:  # QEMU names such a node by its options
                NODE_NAMES[simple[0]] = keyed_node_name(simple[1], simple[0], encrypt)
    _attach_backing_keys(opts.get("backing"))
    opened, fmt = (simple[0], simple[1] or fmt) if simple is not None else ("json:" + json.dumps(opts), fmt)
    _SHOWN_AS[opened] = name
    return opened, fmt


def _attach_backing_keys(backing) -> None:
    """Key options of backing nodes in a spec (``backing.encrypt.key-secret=ID``) follow their
    files, so that tools opening the chain layer by layer (commit) unlock them too."""
    from ..block.spec import key_options, spec_filename
    while isinstance(backing, dict):
        keys, path = key_options(backing), spec_filename(backing)
        if keys is not None and path is not None:
            ATTACHED.attach(path, keys)
        backing = backing.get("backing")


def open_error(filename: str, e: QcowError) -> str:
    return f"Could not open '{filename}': {e}"  # qemu-img prefixes even the driver's own "Could not open"


def expand_long_prefixes(command, args: list[str]) -> list[str]:
    """getopt_long's abbreviations, which every QEMU tool accepts: ``--flush=8`` means
    ``--flush-interval=8`` when exactly one long option of the command starts with ``--flush``
    (an ambiguous or unknown prefix is left for the parser to refuse). Option values are
    skipped, so ``-o --x`` keeps its value."""
    import click
    takes_value: dict[str, bool] = {"--help": False, "-h": False}
    for p in getattr(command, "params", []):
        if isinstance(p, click.Option):
            for o in p.opts + p.secondary_opts:
                takes_value[o] = not (p.is_flag or p.count)
    longs = [o for o in takes_value if o.startswith("--")]
    out: list[str] = []
    value_next = False
    for i, a in enumerate(args):
        if value_next:
            value_next = False
        elif a == "--":
            return out + args[i:]
        elif a.startswith("--"):
            name, eq, val = a.partition("=")
            hits = [o for o in longs if o.startswith(name)] if name not in takes_value else [name]
            if len(hits) == 1:
                a = hits[0] + eq + val
                value_next = takes_value[hits[0]] and not eq
        elif a.startswith("-") and len(a) > 1:
            for j, c in enumerate(a[1:], 1):  # a cluster of short options; one that takes a value ends it
                if takes_value.get("-" + c):
                    value_next = j == len(a) - 1
                    break
        out.append(a)
    return out
