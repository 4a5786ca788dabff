"""Build script: maps the top-level folders onto the one import package ``watchbuy``.

``site`` shadows a standard-library module and ``db``/``engine`` are too generic to claim as
top-level names in a wheel, so every folder installs as a subpackage of ``watchbuy``
(docs/architecture.md, "one import name"; the mapping is in pyproject.toml).  The Cython
codecs are compiled here; each has a pure-Python twin, so an install without a compiler still
works (slower).  ``WATCHBUY_NO_EXTENSIONS=1`` builds without compiling, as aiohttp's
``AIOHTTP_NO_EXTENSIONS`` does; the same switch makes the codec selector load the twins.
"""

import os

from setuptools import Extension, setup

CODECS = ["_chunk", "_amf", "_flvmux", "_fmp4"]


def no_extensions() -> bool:
    """Whether WATCHBUY_NO_EXTENSIONS is on: unset, "", "0", "false", "no" are off.

    Twin of ``switch_is_on`` in engine/codecs.py (this script runs before the package can be
    imported); tests/test_codec_selection.py checks that both read a table of values alike.
    """
    value = os.environ.get("WATCHBUY_NO_EXTENSIONS") or ""
    return value.strip().lower() not in ("", "0", "false", "no")


def extensions() -> list:
    if no_extensions():
        return []
    from Cython.Build import cythonize

    modules = [
        Extension(f"watchbuy.engine.{name}", [f"engine/{name}.pyx"], extra_compile_args=["-O3"])
        for name in CODECS
        if os.path.exists(f"engine/{name}.pyx")
    ]
    # Compiler directives live in each .pyx's `# cython:` header alone, so a file compiles the
    # same under this script, `cythonize -i` or `cython -a` (tests/test_codec_selection.py).
    return cythonize(modules)


# Packages and the folder mapping are declared in pyproject.toml; only the extensions need code.
setup(ext_modules=extensions())
