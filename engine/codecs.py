"""Chooses the compiled codecs or their pure-Python twins (the msgpack/aiohttp pattern).

``from watchbuy.engine.codecs import chunk, amf, flvmux, fmp4`` gives modules with one API whichever
implementation is loaded.  The compiled extensions are preferred; ``WATCHBUY_PUREPYTHON=1`` forces
the twins (tests use it to run one suite against both), and a missing extension (an install
without a compiler) falls back to the twins with a warning, so the node still runs, slower.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

log = logging.getLogger(__name__)

CODEC_NAMES = ("chunk", "amf", "flvmux", "fmp4")


def purepython_forced() -> bool:
    return os.environ.get("WATCHBUY_PUREPYTHON", "").strip().lower() not in ("", "0", "false", "no")


def load_pure(name: str) -> ModuleType:
    """The pure-Python twin of codec ``name``."""
    return importlib.import_module(f"watchbuy.engine._{name}_py")


def load_compiled(name: str) -> ModuleType:
    """The compiled codec ``name``; raises ImportError when it was not built."""
    return importlib.import_module(f"watchbuy.engine._{name}")


def load(name: str) -> ModuleType:
    if purepython_forced():
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
