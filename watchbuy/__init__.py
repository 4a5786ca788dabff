"""WatchBuy: live-stream shopping.

The subpackages live in top-level folders of the repository and install under this one name:
``watchbuy.engine`` (media node), ``watchbuy.site``, ``watchbuy.balancer``,
``watchbuy.status_agent`` and ``watchbuy.db``.

``watchbuy.__version__`` (and :func:`version`) is the version in pyproject.toml, the one place it
is written: read from the installed distribution's metadata, or, in a source checkout that was
never installed, from pyproject.toml itself.
"""

from __future__ import annotations

from pathlib import Path

DISTRIBUTION = "watchbuy"
UNKNOWN_VERSION = "0+unknown"


def version() -> str:
    """The installed distribution's version; pyproject.toml's when run from an uninstalled checkout."""
    # Imported here, not at the top: every `import watchbuy...` would otherwise pay for them.
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version(DISTRIBUTION)
    except PackageNotFoundError:
        pass
    import tomllib

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        with pyproject.open("rb") as file:
            project = tomllib.load(file).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return UNKNOWN_VERSION
    if project.get("name") != DISTRIBUTION:  # some other project's file above an unpacked copy
        return UNKNOWN_VERSION
    return str(project.get("version", UNKNOWN_VERSION))


def __getattr__(name: str) -> str:
    # PEP 562: `watchbuy.__version__` is computed on first use, so importing the package stays
    # free of metadata look-ups.
    if name == "__version__":
        return version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
