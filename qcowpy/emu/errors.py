"""Errors raised by the emulator.

Every error is a :class:`qcowpy.errors.QcowError`, so callers that already catch the package's
hierarchy keep working. ``qmp_class`` is the QMP error class the QMP server reports for it.
"""
from __future__ import annotations

from qcowpy.errors import QcowError


class EmuError(QcowError):
    """Base of every error the emulator raises on purpose (QMP class GenericError)."""

    qmp_class = "GenericError"


class TypeNotFound(EmuError, LookupError):
    """No QOM type is registered under the requested name."""


class TypeCastError(EmuError, TypeError):
    """An object was cast to a type it is not an instance of."""


class PropertyError(EmuError, ValueError):
    """A property does not exist, or its value cannot be parsed or set."""


class PathNotFound(EmuError, LookupError):
    """A QOM path does not resolve to an object."""

    qmp_class = "DeviceNotFound"


class DeviceError(EmuError):
    """A device could not be created, realized, plugged or unplugged."""


class CommandNotFound(EmuError):
    """A monitor or QMP command does not exist."""

    qmp_class = "CommandNotFound"
