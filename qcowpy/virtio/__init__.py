"""The transport-free virtio engine: split virtqueues over a guest-memory interface and the
virtio-blk request engine on a BlockDevice. Shared by the emulator's virtio-pci transport
(``qcowpy.emu.virtio``) and the vhost-user-blk back-end (``qcowpy.export.vhost_user``)."""
