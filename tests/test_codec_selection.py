"""The selector: compiled codecs by default, twins on request, both with one API."""

from __future__ import annotations

import os
import subprocess
import sys

from watchbuy.engine import codecs


def test_compiled_codecs_are_in_use():
    # A set-up that silently fell back to the twins would pass every other test, only slower.
    if codecs.purepython_forced():
        return
    assert codecs.implementations() == {
        "chunk": "cython", "amf": "cython", "flvmux": "cython", "fmp4": "cython"
    }


def test_purepython_env_forces_the_twins():
    out = subprocess.run(
        [sys.executable, "-c",
         "from watchbuy.engine import codecs; print(sorted(codecs.implementations().values()))"],
        env={**os.environ, "WATCHBUY_PUREPYTHON": "1"}, capture_output=True, text=True,
        check=True,
    ).stdout
    assert out.strip() == "['python', 'python', 'python', 'python']"


def test_twins_share_the_public_api():
    for name in codecs.CODEC_NAMES:
        compiled, twin = codecs.load_compiled(name), codecs.load_pure(name)
        public = {n for n in dir(twin) if not n.startswith("_") and callable(getattr(twin, n))}
        public -= {"annotations"}
        missing = {n for n in public if not hasattr(compiled, n)}
        # helpers the twin imports (e.g. exception classes) are shared, not re-exported
        assert not {n for n in missing if n[0].islower()}, (name, missing)
