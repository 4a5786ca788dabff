"""Build script: maps the top-level folders onto the one import package ``watchbuy``.

``site`` shadows a standard-library module and ``db``/``engine`` are too generic to claim as
top-level names in a wheel, so every folder installs as a subpackage of ``watchbuy``
(docs/architecture.md, "one import name"; the mapping is in pyproject.toml).  The Cython
codecs are compiled here; each has a pure-Python twin, so an install without a compiler still
works (slower).
"""

import os

from setuptools import Extension, setup

CODECS = ["_chunk", "_amf", "_flvmux", "_fmp4"]


def extensions() -> list:
    if os.environ.get("WATCHBUY_NO_EXTENSIONS"):
        return []
    from Cython.Build import cythonize

    modules = [
        Extension(f"watchbuy.engine.{name}", [f"engine/{name}.pyx"], extra_compile_args=["-O3"])
        for name in CODECS
        if os.path.exists(f"engine/{name}.pyx")
    ]
    return cythonize(
        modules,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


# Packages and the folder mapping are declared in pyproject.toml; only the extensions need code.
setup(ext_modules=extensions())
