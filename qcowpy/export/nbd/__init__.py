"""The NBD server (``qcowpy nbd``): fixed newstyle negotiation and the transmission phase over any BlockDevice."""
from .server import Export, NbdServer

__all__ = ["Export", "NbdServer"]
