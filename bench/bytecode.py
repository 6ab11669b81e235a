"""Byte-compile qcowpy before timing it, so the benchmarks time what an installed qcowpy runs.

``pip install .`` byte-compiles every module into ``__pycache__``; a source checkout or an
editable install run with ``PYTHONDONTWRITEBYTECODE=1`` (which this project's machines set)
compiles every module it imports again on every command: about 60 modules and 50-80 ms per
``convert`` here, which is start-up cost no installed copy pays. Every bench calls
:func:`ensure_bytecode` once before its first timed run.
"""
from __future__ import annotations

import compileall
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_bytecode(tree: str | Path | None = None) -> None:
    """Write the ``.pyc`` files pip would for the qcowpy package in ``tree`` (this checkout by
    default); py_compile writes them whatever the environment says."""
    compileall.compile_dir(str(Path(tree or ROOT) / "qcowpy"), quiet=1)
