"""Servers that hand a BlockDevice to other programs: the NBD server (docs/nbd.md), vhost-user-blk,
FUSE and the storage daemon (docs/storage-daemon.md).

They see storage only through :mod:`qcowpy.block`."""
