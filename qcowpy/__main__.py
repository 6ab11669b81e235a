"""``python -m qcowpy``: the same as the ``qcowpy`` command."""
from qcowpy.cli.main import main

if __name__ == "__main__":
    main()
