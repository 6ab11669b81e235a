"""Servers that hand a BlockDevice to other programs; they see storage only through qcowpy.block."""
