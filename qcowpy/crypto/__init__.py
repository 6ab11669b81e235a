"""Disk encryption as QEMU's crypto layer does it, over the ``cryptography`` package.

Pure codecs and key handling, no image I/O: ``algorithms`` (names QEMU uses -> cipher and hash
objects, PBKDF2), ``ivgen`` (plain, plain64, essiv), ``afsplit`` (the LUKS anti-forensic
splitter), ``sector`` (sector-wise encryption of a buffer), ``luks`` (LUKS1 header, key slots,
create/unlock/amend), ``qcowaes`` (the legacy qcow2 AES key) and ``secret`` (``--object
secret`` values). The qcow2 engine plugs them in through ``qcow2/encryption.py``. No
primitive is implemented here: every cipher, hash and KDF is the library's.
"""
