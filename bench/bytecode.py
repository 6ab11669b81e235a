"""Time qcowpy as a user runs it: byte-compiled, or installed in a virtual environment.

``pip install .`` byte-compiles every module into ``__pycache__``; a source checkout or an
editable install run with ``PYTHONDONTWRITEBYTECODE=1`` (which this project's machines set)
compiles every module it imports again on every command: about 60 modules and 50-80 ms per
``convert`` here, which is start-up cost no installed copy pays. Every bench calls
:func:`ensure_bytecode` once before its first timed run.

:func:`installed` goes one step further for the start-up-sensitive rows: a throw-away venv with
``pip install`` of the checkout (not editable), whose ``qcowpy`` console script is what a user
types. It skips two costs of this development machine that are not qcowpy's: the editable
install's import hook (~10 ms) and a .pth file the base interpreter loads on every start (~9 ms).
"""
from __future__ import annotations

import compileall
import os
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_bytecode(tree: str | Path | None = None) -> None:
    """Write the ``.pyc`` files pip would for the qcowpy package in ``tree`` (this checkout by
    default); py_compile writes them whatever the environment says."""
    compileall.compile_dir(str(Path(tree or ROOT) / "qcowpy"), quiet=1)


def installed(dest: str | Path, tree: str | Path | None = None) -> list[str]:
    """The command that runs qcowpy installed (``pip install TREE``) into a venv at ``dest``. A venv
    that exists already gets the tree installed again (without its dependencies), so a reused
    work directory never times an older copy."""
    dest = Path(dest)
    script = dest / "bin" / "qcowpy"
    again = script.exists()
    if not again:
        venv.create(dest, with_pip=True)
    p = subprocess.run([str(dest / "bin" / "python"), "-m", "pip", "install", "-q",
                        *(["--no-deps", "--force-reinstall"] if again else []), str(tree or ROOT)],
                       capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if p.returncode != 0:
        raise SystemExit(f"pip install {tree or ROOT} into {dest} failed:\n{p.stdout}{p.stderr}")
    return [str(script)]
