"""Which driver a filename names, decided from the name alone.

Kept apart from the drivers so that recognising ``nbd://`` or ``rbd:`` costs nothing at
start-up: the NBD client (ssl) and the rbd driver (librbd) load only when such a name is used.
"""
from __future__ import annotations

NBD_SCHEMES = ("nbd://", "nbd+tcp://", "nbd+unix://", "nbds://", "nbds+tcp://", "nbds+unix://", "nbd:")


def is_nbd_uri(name: str) -> bool:
    return name.startswith(NBD_SCHEMES)
