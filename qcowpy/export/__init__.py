"""Servers that hand a BlockDevice to other programs (vhost-user-blk, the storage daemon).

They see storage only through :mod:`qcowpy.block`; see docs/storage-daemon.md."""
