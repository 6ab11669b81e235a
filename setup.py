"""Build the Cython kernels in ext/ into the qcowpy package, and the completion notices librbd's
callbacks signal without the GIL (ext/_notice.pyx)."""
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("qcowpy._ext", ["ext/_ext.pyx"]), Extension("qcowpy._notice", ["ext/_notice.pyx"])],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
    )
)
