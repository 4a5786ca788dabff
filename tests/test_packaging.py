"""The release build: `make wheel` makes one binary wheel that holds the compiled codecs under one
name, repaired into a manylinux tag that Amazon Linux 2023 and Ubuntu 22.04 install, and
`watchbuy --version` tells which version is installed.

One session-scoped build serves every test here: compiling the codecs is the slow part.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.utils import parse_wheel_filename

from watchbuy.engine.codecs import CODEC_NAMES

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent  # the venv running the tests: `make`'s VENV
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
CODECS = tuple(f"_{name}" for name in CODEC_NAMES)  # every codec the selector knows
# Amazon Linux 2023 has glibc 2.34 (Ubuntu 22.04: 2.35); a manylinux_2_X wheel installs on any
# glibc >= 2.X (PEP 600).
EC2_GLIBC_MINOR = 34
# The legacy manylinux names auditwheel still writes beside the PEP 600 ones, as (2, X).
LEGACY_MANYLINUX = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}


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


def glibc_minor(platform_tag: str) -> int | None:
    """X of a manylinux_2_X tag (or its legacy alias) for this machine's architecture."""
    arch = platform.machine()
    match = re.fullmatch(rf"manylinux_2_(\d+)_{re.escape(arch)}", platform_tag)
    if match:
        return int(match.group(1))
    for legacy, minor in LEGACY_MANYLINUX.items():
        if platform_tag == f"{legacy}_{arch}":
            return minor
    return None


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> dict[str, Path]:
    """`make wheel` in a clean copy of the tree: {"raw": the build's wheel, "repaired": dist/'s}."""
    source = clean_copy(tmp_path_factory.mktemp("src"))
    # The Makefile's own target with this venv's tools (--no-isolation: no download), the set-up
    # stamp taken as done (-o) so make never reinstalls the project from the temporary copy.
    proc = subprocess.run(
        ["make", "-C", str(source), f"VENV={VENV}", "-o", f"{VENV}/.installed", "wheel"],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "WATCHBUY_NO_EXTENSIONS": ""},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    (raw,) = (source / "build" / "raw-wheel").glob("watchbuy-*.whl")
    (repaired,) = (source / "dist").glob("watchbuy-*.whl")
    return {"raw": raw, "repaired": repaired}


def test_wheel_is_binary_and_holds_the_compiled_codecs(release, tmp_path):
    for wheel in release.values():
        assert "-cp3" in wheel.name and "linux" in wheel.name  # a binary wheel, not py3-none-any
        names = zipfile.ZipFile(wheel).namelist()
        for codec in CODECS:
            assert any(n.startswith(f"watchbuy/engine/{codec}.") and n.endswith(".so")
                       for n in names)
            assert f"watchbuy/engine/{codec}_py.py" in names
        for package in ("engine", "site", "balancer", "status_agent", "db"):
            assert f"watchbuy/{package}/__init__.py" in names
        # the site's pages and assets, read from its package folder at run time
        assert "watchbuy/site/templates/base.html" in names
        assert "watchbuy/site/static/css/site.css" in names
        # one top-level name only; nothing grafted (the codecs link libc alone)
        assert {n.split("/")[0] for n in names if not n.startswith("watchbuy-")} == {"watchbuy"}
        assert not any(".libs/" in n for n in names)
    # the wheel's compiled codec imports and is the one chosen
    target = tmp_path / "unpacked"
    zipfile.ZipFile(release["raw"]).extractall(target)
    check = subprocess.run(
        [sys.executable, "-c",
         "import watchbuy.engine.codecs as c, json; print(json.dumps(c.implementations()));"
         "print(c.chunk.__file__)"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target), "WATCHBUY_NO_EXTENSIONS": ""},
    )
    assert check.returncode == 0, check.stderr
    assert '"chunk": "cython"' in check.stdout and str(target) in check.stdout


def test_release_wheel_has_a_manylinux_tag_ec2_accepts(release):
    raw_tags = parse_wheel_filename(release["raw"].name)[3]
    assert {tag.platform for tag in raw_tags} == {f"linux_{platform.machine()}"}  # repair needed
    name, version, _build, tags = parse_wheel_filename(release["repaired"].name)
    assert (str(name), str(version)) == ("watchbuy", PYPROJECT_VERSION)
    minors = [glibc_minor(tag.platform) for tag in tags]
    # every tag is a manylinux one for this architecture: no bare linux_* left behind
    assert None not in minors, [tag.platform for tag in tags]
    assert min(minors) <= EC2_GLIBC_MINOR, [tag.platform for tag in tags]
    # the WHEEL metadata installers read says the same as the file name
    wheel_meta = zipfile.ZipFile(release["repaired"]).read(
        f"watchbuy-{version}.dist-info/WHEEL").decode()
    assert {f"Tag: {tag}" for tag in tags} <= set(wheel_meta.splitlines())


def test_release_wheel_installs_and_runs_its_codecs_in_a_clean_venv(release, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # --no-deps: the codecs and `--version` need nothing but the standard library
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         str(release["repaired"])],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "WATCHBUY_NO_EXTENSIONS", "VIRTUAL_ENV")}
    check = subprocess.run(
        [str(python), "-c",
         "import json\n"
         + "".join(f"import watchbuy.engine.{codec}\n" for codec in CODECS) +
         "import watchbuy.engine.codecs as c\n"
         "print(json.dumps({'impl': c.implementations(), 'file': c.chunk.__file__}))"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )
    assert check.returncode == 0, check.stderr
    report = json.loads(check.stdout)
    assert report["impl"] == {name: "cython" for name in CODEC_NAMES}
    assert report["file"].startswith(str(venv)) and report["file"].endswith(".so")
    # the console script reads the installed distribution's metadata
    version = subprocess.run(
        [str(venv / "bin" / "watchbuy"), "--version"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"watchbuy {PYPROJECT_VERSION}"


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "watchbuy"],
    [str(Path(sys.executable).parent / "watchbuy")],  # the console script of this venv's install
], ids=["python -m watchbuy", "console script"])
def test_version_prints_the_pyproject_version_and_exits_0(command, tmp_path):
    proc = subprocess.run(
        [*command, "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"watchbuy {PYPROJECT_VERSION}"


def test_version_of_an_uninstalled_checkout_is_pyproject_s(tmp_path):
    """No distribution metadata at all (a bare source tree): pyproject.toml answers."""
    source = tmp_path / "checkout"
    shutil.copytree(ROOT / "watchbuy", source / "watchbuy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (source / "pyproject.toml").write_text(
        (ROOT / "pyproject.toml").read_text().replace(
            f'version = "{PYPROJECT_VERSION}"', 'version = "9.8.7"', 1))
    # -S: no site-packages, so no installed watchbuy's metadata can answer instead
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c",
         "import sys; sys.path.insert(0, sys.argv[1])\n"
         "import importlib.metadata as m, watchbuy\n"
         "assert watchbuy.__file__.startswith(sys.argv[1]), watchbuy.__file__\n"
         "assert not any(d.metadata['Name'] == 'watchbuy' for d in m.distributions())\n"
         "print(watchbuy.__version__)",
         str(source)],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "9.8.7"
