"""Where the app's non-Python files are: ``templates/``, ``static/`` and ``migrations/``.

In a source checkout (and an editable install) they sit at the repository's top level,
beside ``app/``; an installed wheel carries them inside the package as ``app/templates``,
``app/static`` and ``app/migrations`` (``[tool.setuptools.package-dir]`` in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
RESOURCES = ("templates", "static", "migrations")


def resource_dir(name: str) -> Path:
    """The folder ``name`` (one of :data:`RESOURCES`), installed or in the checkout."""
    if name not in RESOURCES:
        raise ValueError(f"unknown resource folder {name!r}; expected one of {', '.join(RESOURCES)}")
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the app's {name}/ folder is missing: looked in {PACKAGE_DIR} and {PACKAGE_DIR.parent}")


TEMPLATE_DIR = resource_dir("templates")
STATIC_DIR = resource_dir("static")
MIGRATIONS_DIR = resource_dir("migrations")
