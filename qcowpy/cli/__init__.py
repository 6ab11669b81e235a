"""The ``qcowpy`` command line, a drop-in for ``qemu-img`` (see docs/cli.md)."""
