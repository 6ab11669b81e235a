"""Byte sizes as qemu-img reads and prints them.

``parse_size`` follows QEMU's ``qemu_strtosz`` rules (checked against qemu-img 7.2):

* a decimal integer, optionally followed by one suffix ``b/B`` (bytes) or ``k/K``, ``m/M``,
  ``g/G``, ``t/T``, ``p/P``, ``e/E`` (powers of 1024);
* a decimal fraction (``1.5G``, ``1.k``) only with a suffix larger than bytes; the result is
  rounded to the nearest byte (halves up); exponents (``1e3``) are rejected;
* hexadecimal ``0x...`` without a fraction (a suffix is accepted but deprecated: a warning);
* leading white space and ``+`` are accepted (as ``strtoull`` does), a ``-`` anywhere is not;
* anything left over after the suffix is an error.

``format_size`` is QEMU's ``size_to_str`` ("20 GiB", "1.25 MiB", "196 KiB").
"""
from __future__ import annotations

import math
import re
import warnings

from .errors import InvalidArgument

INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
_MULT = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


class SizeError(InvalidArgument):
    """A size string qemu would reject; ``out_of_range`` tells overflow from bad syntax."""

    def __init__(self, message: str, out_of_range: bool = False, hint: str | None = None):
        super().__init__(message)
        self.out_of_range = out_of_range
        self.hint = hint  # printed after the message without the program prefix, as QEMU's hints


class HexSuffixWarning(UserWarning):
    """qemu warns: 'Using a multiplier suffix on hex numbers is deprecated'."""


_DEC = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")
_HEX = re.compile(r"[ \t\n\v\f\r]*[+-]?0[xX]([0-9a-fA-F]+)")
_FRAC = re.compile(r"\.[0-9]*(?:[eE][+-]?[0-9]+)?")


def strtosz(text: str) -> int:
    """Parse ``text`` exactly as ``qemu_strtosz`` does; return the size in bytes (0..2**64-1).

    Raises :class:`SizeError` (``out_of_range`` set on overflow). A hex number with a suffix
    emits a :class:`HexSuffixWarning`, as qemu prints a deprecation warning.
    """
    m = _DEC.match(text)
    if not m:
        raise SizeError(f"Invalid size '{text}'")
    digits = m.group(0)
    if "-" in digits:
        raise SizeError(f"Invalid size '{text}'")
    val = int(digits.strip().lstrip("+"))
    end = m.end()
    if val > UINT64_MAX:
        _overflow(text, end)
    hexnum = False
    fraction = 0.0
    if val == 0 and text[end:end + 1] in ("x", "X"):
        hm = _HEX.match(text)
        if hm:
            val = int(hm.group(1), 16)
            end = hm.end()
            if val > UINT64_MAX:
                _overflow(text, end)
            if text[end:end + 1] == ".":
                raise SizeError(f"Invalid size '{text}'")
            hexnum = True
    elif text[end:end + 1] == ".":
        fm = _FRAC.match(text, end)
        assert fm is not None
        body = fm.group(0)
        if "e" in body.lower():
            raise SizeError(f"Invalid size '{text}'")
        if len(body) > 1:
            fraction = float("0" + body)
        end = fm.end()
    suffix = text[end:end + 1].lower()
    if suffix and suffix in _MULT:
        if hexnum:
            warnings.warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}", HexSuffixWarning,
                          stacklevel=2)
        end += 1
        mul = 1 << (10 * _MULT[suffix])
    else:
        mul = 1
    valf = min(int(fraction * 2.0 ** 64), UINT64_MAX) if fraction else 0
    if mul == 1:
        if valf:
            raise SizeError(f"Invalid size '{text}'")
        result = val
    else:
        prod = valf * mul
        result = val * mul + (prod >> 64) + ((prod & UINT64_MAX) >> 63)
        if result > UINT64_MAX:
            _overflow(text, end)
    if text[end:]:
        raise SizeError(f"Invalid size '{text}'")
    return result


def _overflow(text: str, end: int) -> None:
    if text[end:]:
        raise SizeError(f"Invalid size '{text}'")
    raise SizeError(f"Size '{text}' is too large", out_of_range=True)


def cvtnum(name: str, text: str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """qemu-img's ``cvtnum``: a size for a command-line argument, with qemu-img's messages."""
    try:
        value = strtosz(text)
    except SizeError as e:
        if not e.out_of_range:
            raise SizeError(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n"
                            "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.") from None
        value = -1
    if value < minimum or value > maximum:
        raise SizeError(f"Invalid {name} specified. Must be between {minimum} and {maximum}.", out_of_range=True)
    return value


def parse_size(value: int | str, name: str = "size") -> int:
    """A size for the Python API: an int, or a string with qemu's suffixes ("20G", "1.5M")."""
    if isinstance(value, bool):
        raise InvalidArgument(f"Invalid {name}: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"Invalid {name}: must not be negative")
        return value
    return cvtnum(name, str(value))


def parse_option_size(name: str, value: int | str) -> int:
    """A size-typed ``-o`` option (e.g. cluster_size) with qemu's option-parser messages."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        return strtosz(str(value))
    except SizeError as e:
        if e.out_of_range:
            raise SizeError(f"Value '{value}' is out of range for parameter '{name}'", True) from None
        raise SizeError(f"Parameter '{name}' expects a non-negative number below 2^64",
                        hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
                             "and exabytes, respectively.\n") from None


_PREFIX = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]


def format_size(value: int) -> str:
    """QEMU's ``size_to_str``: three significant digits and a binary prefix ("1.25 MiB")."""
    _, exp = math.frexp(value / (1000.0 / 1024.0))
    i = max(0, (exp - 1) // 10) if value else 0
    i = min(i, 6)
    return f"{_c_g3(value / (1 << (10 * i)))} {_PREFIX[i]}B"


def _c_g3(x: float) -> str:
    """printf("%0.3g")."""
    return "%0.3g" % x


_STRTOUL = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX](?=[0-9a-fA-F])[0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")


def strtoul(text: str) -> int | None:
    """QEMU's ``qemu_strtoul(text, NULL, 0, &res)``: C's ``strtoul`` in base 0 (``0x`` hex,
    leading ``0`` octal, leading blanks, a sign; ``-N`` wraps modulo 2**64) with nothing left
    over. None where QEMU returns an error (no digits, trailing text, overflow)."""
    m = _STRTOUL.fullmatch(text)
    if not m:
        return None
    sign, digits = m.groups()
    base = 16 if digits[:2].lower() == "0x" else 8 if digits.startswith("0") else 10
    value = int(digits, base)
    if value > UINT64_MAX:
        return None
    return (-value) % (1 << 64) if sign == "-" else value


def c_hex(v: int) -> str:
    """C's ``%#x``: hexadecimal with a 0x prefix, except that 0 prints as a bare 0."""
    return hex(v) if v else "0"
