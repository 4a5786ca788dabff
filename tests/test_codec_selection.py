"""The selector: compiled codecs by default, twins with ``WATCHBUY_NO_EXTENSIONS``, one API.

The same switch tells setup.py to build without compiling; its parse is a copy (setup.py runs
before the package can be imported), held here to the selector's on a table of values.  The
compiler directives of the extensions live in one place, each .pyx's ``# cython:`` header.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from watchbuy.engine import codecs

ROOT = Path(__file__).resolve().parents[1]
SWITCH = codecs.NO_EXTENSIONS_ENV
disabled = pytest.mark.skipif(
    codecs.extensions_disabled(), reason=f"{SWITCH} is on: this run tests the twins alone"
)


def selection(value: str | None) -> list[str]:
    """The implementations a fresh interpreter picks with the switch at ``value`` (None: unset),
    as printed; its stderr must be empty (no warning, no traceback)."""
    env = {k: v for k, v in os.environ.items() if k != SWITCH}
    if value is not None:
        env[SWITCH] = value
    proc = subprocess.run(
        [sys.executable, "-c",
         "from watchbuy.engine import codecs; print(sorted(codecs.implementations().values()))"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert proc.stderr == "", proc.stderr
    return proc.stdout.strip()


@disabled
def test_compiled_codecs_are_in_use():
    # A default build that silently fell back to the twins would pass every other test, only
    # slower: this is the test that fails then.
    assert codecs.implementations() == {name: "cython" for name in codecs.CODEC_NAMES}


@disabled
@pytest.mark.parametrize("value", [None, "", "0", "false", "No "])
def test_switch_off_loads_the_compiled_codecs(value):
    assert selection(value) == "['cython', 'cython', 'cython', 'cython']"


@pytest.mark.parametrize("value", ["1", "yes", "true", " TRUE "])
def test_switch_on_loads_the_twins(value):
    # Whether or not compiled modules exist: the switch wins, quietly.
    assert selection(value) == "['python', 'python', 'python', 'python']"


def setup_py_no_extensions():
    """setup.py's own ``no_extensions``, run without running setup.py (that would build)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    (func,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "no_extensions"]
    namespace: dict = {}
    module = ast.fix_missing_locations(
        ast.Module(body=[ast.Import(names=[ast.alias("os")]), func], type_ignores=[]))
    exec(compile(module, "setup.py", "exec"), namespace)
    return namespace["no_extensions"]


@pytest.mark.parametrize("value", [
    None, "", " ", "0", "false", "False", "FALSE", "no", "No", " no ",
    "1", "true", "yes", "on", "off", "2", "anything",
])
def test_setup_py_and_the_selector_read_the_switch_alike(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(SWITCH, raising=False)
    else:
        monkeypatch.setenv(SWITCH, value)
    expected = value is not None and value.strip().lower() not in ("", "0", "false", "no")
    assert codecs.extensions_disabled() is expected
    assert setup_py_no_extensions()() is expected


@disabled
def test_twins_share_the_public_api():
    for name in codecs.CODEC_NAMES:
        compiled, twin = codecs.load_compiled(name), codecs.load_pure(name)
        # What the twin itself defines (not what it imports: exception classes, typing helpers)
        public = {n for n in dir(twin) if not n.startswith("_") and callable(getattr(twin, n))
                  and getattr(getattr(twin, n), "__module__", None) == twin.__name__}
        missing = {n for n in public if not hasattr(compiled, n)}
        assert not missing, (name, missing)


HOUSE_DIRECTIVES = ("# cython: language_level=3, boundscheck=False, wraparound=False, "
                    "cdivision=True, initializedcheck=False")


def test_compiler_directives_live_in_each_pyx_header_only():
    sources = sorted((ROOT / "engine").glob("*.pyx"))
    assert {p.stem for p in sources} == {f"_{name}" for name in codecs.CODEC_NAMES}
    for path in sources:
        text = path.read_text()
        assert text.splitlines()[0] == HOUSE_DIRECTIVES, path.name
        # DEF and IF are deprecated in Cython 3: constants are `cdef enum`s
        assert not re.search(r"^\s*(DEF|IF|ELIF)\s", text, re.M), path.name
    setup_py = (ROOT / "setup.py").read_text()
    assert "compiler_directives" not in setup_py and "language_level" not in setup_py
