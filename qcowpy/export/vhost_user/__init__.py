"""The vhost-user-blk back-end: the vhost-user protocol (docs/interop/vhost-user.rst in QEMU)
over a unix socket, serving virtqueues with the shared engine in :mod:`qcowpy.virtio`."""
from .server import VhostUserBlkServer

__all__ = ["VhostUserBlkServer"]
