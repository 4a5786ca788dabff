"""The ordinary build makes a binary wheel that holds the compiled codecs under one name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def clean_copy(target: Path) -> Path:
    """The source tree as a clean clone would have it: no build/, no in-place .so files."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.split("\n")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_wheel_is_binary_and_holds_the_compiled_codecs(tmp_path):
    source = clean_copy(tmp_path / "src")
    # --no-isolation: build with this venv's setuptools and Cython (the set-up installed them),
    # so the test needs no download; the build backend and setup.py are the real ones.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path),
         str(source)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "WATCHBUY_NO_EXTENSIONS": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("watchbuy-*.whl")
    assert "-cp3" in wheel.name and "linux" in wheel.name  # a binary wheel, not py3-none-any
    names = zipfile.ZipFile(wheel).namelist()
    for codec in ("_chunk", "_amf", "_flvmux"):
        assert any(n.startswith(f"watchbuy/engine/{codec}.") and n.endswith(".so") for n in names)
        assert f"watchbuy/engine/{codec}_py.py" in names
    for package in ("engine", "site", "balancer", "status_agent", "db"):
        assert f"watchbuy/{package}/__init__.py" in names
    # one top-level name only
    assert {n.split("/")[0] for n in names if not n.startswith("watchbuy-")} == {"watchbuy"}
    # the wheel's compiled codec imports and is the one chosen
    target = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(target)
    check = subprocess.run(
        [sys.executable, "-c",
         "import watchbuy.engine.codecs as c, json; print(json.dumps(c.implementations()));"
         "print(c.chunk.__file__)"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target), "WATCHBUY_PUREPYTHON": ""},
    )
    assert check.returncode == 0, check.stderr
    assert '"chunk": "cython"' in check.stdout and str(target) in check.stdout
