"""The release build: `make wheel` makes one binary wheel that holds the compiled codecs under one
name, repaired into a manylinux tag that Amazon Linux 2023 and Ubuntu 22.04 install, and
`watchbuy --version` tells which version is installed; deploy/user-data.sh installs that wheel
into the CPython its tag names, and the IAM policies in deploy/aws allow the AWS calls the code
makes.

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
    return {"raw": raw, "repaired": repaired, "listing": source / "dist" / "WHEEL"}


def test_wheel_is_binary_and_holds_the_compiled_codecs(release, tmp_path):
    for wheel in (release["raw"], release["repaired"]):
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


USER_DATA = ROOT / "deploy" / "user-data.sh"


def user_data_wheel_choice() -> str:
    """The block of user-data.sh that reads a wheel's CPython and checks an interpreter."""
    text = USER_DATA.read_text()
    start = text.index("# --- wheel choice")
    return text[start:text.index("# --- end of wheel choice ---", start)]


def run_user_data(script: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", user_data_wheel_choice() + script],
                          capture_output=True, text=True, cwd=cwd, timeout=60)


def test_user_data_installs_the_wheel_into_the_python_make_wheel_built_it_for(release, tmp_path):
    """`make wheel` lists its wheel in dist/WHEEL; user-data reads the CPython version from that
    name, and only the interpreter that built it passes its check (cache tag cpython-311)."""
    assert release["listing"].read_text().split() == [release["repaired"].name]
    built_for = f"{sys.version_info.major}.{sys.version_info.minor}"
    proc = run_user_data(f'wheel_python "$(tr -d "[:space:]" < {release["listing"]})"', tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == built_for
    # the interpreter that built the wheel passes; the same answer for the same version
    assert run_user_data(f"python_is {sys.executable} {built_for}", tmp_path).returncode == 0
    # another CPython (Ubuntu 24.04's 3.12), or a missing one, does not: user-data then installs
    # the wheel's CPython with uv instead of making a venv pip would refuse the wheel in
    other = tmp_path / "python3.12"
    other.write_text("#!/bin/sh\necho cpython-312\n")
    other.chmod(0o755)
    assert run_user_data(f"python_is {other} {built_for}", tmp_path).returncode == 1
    assert run_user_data(f"python_is {other} 3.12", tmp_path).returncode == 0
    assert run_user_data(f"python_is {tmp_path}/absent {built_for}", tmp_path).returncode == 1
    # a pure-Python or other-implementation wheel is refused with a line naming it
    refused = run_user_data("wheel_python watchbuy-0.1.0-py3-none-any.whl", tmp_path)
    assert refused.returncode == 1 and "not a CPython wheel (tag py3)" in refused.stderr


def test_user_data_makes_the_venv_with_the_checked_python_and_installs_with_it():
    """The steps after the check use what it checked: the venv comes from python3 only when
    python3 is the wheel's CPython, else from uv with that version, and pip runs as the venv's."""
    text = USER_DATA.read_text()
    assert 'PYTHON_VERSION=$(wheel_python "$WHEEL")' in text
    assert 'if python_is python3 "$PYTHON_VERSION"; then\n  python3 -m venv $VENV\n' in text
    assert 'uv python install "$PYTHON_VERSION"' in text
    assert '--python "$PYTHON_VERSION" $VENV' in text
    assert 'python_is $VENV/bin/python "$PYTHON_VERSION" ||' in text
    install = text.index('$VENV/bin/python -m pip install -q "$WORK/$WHEEL"')
    assert text.index("PYTHON_VERSION=$(wheel_python") < install
    assert re.search(r'^UV_VERSION="\d+\.\d+\.\d+"', text, re.M)  # pinned: reproducible


# What each boto3 call the code makes needs in IAM (upload_file may go multipart: a failed one
# aborts its parts, which is its own action).
S3_CALL_ACTIONS = {
    "upload_file": {"s3:PutObject", "s3:AbortMultipartUpload"},
    "put_object": {"s3:PutObject"},
    "delete_object": {"s3:DeleteObject"},
    "download_file": {"s3:GetObject"},
    "get_object": {"s3:GetObject"},
    "get_parameter": {"ssm:GetParameter"},
}
# Which instance role runs which code.
ROLE_CODE = {
    "media-node-policy.json": ["engine/record.py", "deploy/user-data.sh"],
    "site-policy.json": ["site/replays.py", "site/storage.py"],
}


def policy_actions(name: str) -> dict[str, set[str]]:
    """{action: the resources it is allowed on} in deploy/aws/<name>."""
    allowed: dict[str, set[str]] = {}
    for statement in json.loads((ROOT / "deploy" / "aws" / name).read_text())["Statement"]:
        assert statement["Effect"] == "Allow"
        resources = statement["Resource"]
        for action in statement["Action"]:
            allowed.setdefault(action, set()).update(
                [resources] if isinstance(resources, str) else resources)
    return allowed


@pytest.mark.parametrize("policy", sorted(ROLE_CODE))
def test_iam_policies_allow_every_aws_call_the_code_makes(policy):
    allowed = policy_actions(policy)
    calls = set()
    for path in ROLE_CODE[policy]:
        # called, or handed to asyncio.to_thread (storage.py: to_thread(client.put_object, …))
        calls |= set(re.findall(r"\.(" + "|".join(S3_CALL_ACTIONS) + r")\b(?=\s*[(,])",
                                (ROOT / path).read_text()))
    assert calls, ROLE_CODE[policy]  # the grep still finds the calls it is meant to check
    needed = set().union(*(S3_CALL_ACTIONS[call] for call in calls))
    assert needed <= set(allowed), sorted(needed - set(allowed))
    # and nothing of S3 beyond them: least privilege
    assert {a for a in allowed if a.startswith("s3:")} <= needed


def test_replay_bucket_in_the_env_template_is_the_one_the_policies_name():
    env = dict(line.split("=", 1) for line in
               (ROOT / "deploy" / "watchbuy.env.example").read_text().splitlines()
               if line.startswith("WATCHBUY_RECORD_S3_"))
    replays = f"arn:aws:s3:::{env['WATCHBUY_RECORD_S3_BUCKET']}/{env['WATCHBUY_RECORD_S3_PREFIX']}*"
    assert policy_actions("media-node-policy.json")["s3:PutObject"] == {replays}
    assert policy_actions("site-policy.json")["s3:DeleteObject"] == {replays}
