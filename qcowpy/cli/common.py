"""What every CLI command module shares: the program name, failure exits and message lines.

Kept apart from main.py (which registers the commands) so command modules import it without
importing main, and main imports them without a cycle.
"""
from __future__ import annotations

import os
import sys
import warnings

from ..errors import QcowError
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


def error_line(message: str) -> None:
    for line in message.split("\n"):
        sys.stderr.write(f"{PROG}: {line}\n")


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
    if fmt is not None or not os.path.isfile(filename):
        return
    from ..block.open import probe_format
    try:
        probed = probe_format(filename)
    except (OSError, QcowError):
        return
    if probed == "raw":
        sys.stderr.write(f"WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n"
                         "         Automatically detecting the format is dangerous for raw images, write "
                         "operations on block 0 will be restricted.\n"
                         "         Specify the 'raw' format explicitly to remove the restrictions.\n")


def open_error(filename: str, e: QcowError) -> str:
    return f"Could not open '{filename}': {e}"  # qemu-img prefixes even the driver's own "Could not open"
