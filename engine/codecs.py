"""Chooses the compiled codecs or their pure-Python twins (the msgpack/aiohttp pattern).

``from watchbuy.engine.codecs import chunk, amf, flvmux, fmp4`` gives modules with one API whichever
implementation is loaded.  The compiled extensions are preferred.  One switch,
``WATCHBUY_NO_EXTENSIONS``, serves the build and the run as in aiohttp: set, setup.py builds
nothing to compile and this selector loads the twins even where compiled modules exist (tests use
it to run the suite on the twins alone).  A missing extension with the switch off (an install
without a compiler) falls back to the twins with a warning, so the node still runs, slower.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

CODEC_NAMES = ("chunk", "amf", "flvmux", "fmp4")

NO_EXTENSIONS_ENV = "WATCHBUY_NO_EXTENSIONS"
# Values that leave the switch off.  setup.py keeps its own copy of this rule (it runs before the
# package is importable); tests/test_codec_selection.py checks the two agree.
SWITCH_OFF_VALUES = ("", "0", "false", "no")


def switch_is_on(value: str | None) -> bool:
    """Whether an environment value turns a switch on: unset, "", "0", "false", "no" are off."""
    return (value or "").strip().lower() not in SWITCH_OFF_VALUES


def extensions_disabled() -> bool:
    """Whether ``WATCHBUY_NO_EXTENSIONS`` asks for the pure-Python twins."""
    return switch_is_on(os.environ.get(NO_EXTENSIONS_ENV))


def load_pure(name: str) -> ModuleType:
    """The pure-Python twin of codec ``name``."""
    return importlib.import_module(f"watchbuy.engine._{name}_py")


def load_compiled(name: str) -> ModuleType:
    """The compiled codec ``name``; raises ImportError when it was not built."""
    return importlib.import_module(f"watchbuy.engine._{name}")


def load(name: str) -> ModuleType:
    """Codec ``name`` as the node runs it: compiled unless disabled or missing."""
    if extensions_disabled():
        return load_pure(name)
    try:
        return load_compiled(name)
    except ImportError as exc:
        log.warning("compiled codec %s not available (%s); using the pure-Python twin", name, exc)
        return load_pure(name)


chunk = load("chunk")
amf = load("amf")
flvmux = load("flvmux")
fmp4 = load("fmp4")


def implementations() -> dict[str, str]:
    """Which implementation each codec runs on: ``{"chunk": "cython", ...}``."""
    return {
        name: ("python" if module.__name__.endswith("_py") else "cython")
        for name, module in (("chunk", chunk), ("amf", amf), ("flvmux", flvmux), ("fmp4", fmp4))
    }
