"""The installed package is complete: the wheel the Dockerfile's ``pip install .`` builds
carries every Python package and the top-level templates/, static/ and migrations/.

The wheel is built from this checkout and unpacked into a folder that is put first on
``sys.path`` of a fresh interpreter running elsewhere, so nothing can come from the checkout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"app", "ml", "templates", "static", "migrations", "tests", "bench", "docs", "scripts",
             "docker-compose.yml", "Dockerfile"}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("pcbm_studio-*.whl")
    return found


def test_the_top_level_is_the_design_cards():
    names = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
    assert names >= TOP_LEVEL
    assert not (ROOT / "app" / "templates").exists() and not (ROOT / "app" / "migrations").exists()


def test_the_wheel_holds_every_package_and_resource(wheel):
    members = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for base in ("ml", "app") for p in (ROOT / base).rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in members, f"package {package} is missing from the wheel"
    for source in ("templates", "static", "migrations"):
        for path in (ROOT / source).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                assert f"app/{source}/{path.relative_to(ROOT / source)}" in members, path
    assert any(m.startswith("ml/demo/checkpoint/") for m in members)


def test_an_installed_wheel_finds_its_templates_static_files_and_migrations(wheel, tmp_path):
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = (
        "import json, app.resources as r, app.migrate as m, app.templating as t\n"
        "env = t.make_environment()\n"
        "print(json.dumps({'package': str(r.PACKAGE_DIR), 'templates': str(r.TEMPLATE_DIR),"
        " 'static': str(r.STATIC_DIR), 'head': m.head_revision(),"
        " 'base': env.get_template('base.html').filename}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, check=True)
    found = json.loads(done.stdout)
    assert found["package"] == str(target / "app")
    assert found["templates"] == str(target / "app" / "templates")
    assert found["static"] == str(target / "app" / "static")
    assert found["base"].startswith(str(target / "app" / "templates"))
    from app.migrate import head_revision

    assert found["head"] == head_revision()
