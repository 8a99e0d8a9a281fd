"""Layering rules from docs/design.md, checked on the source (no imports executed)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_ML = {"app", "fastapi", "sqlalchemy", "jinja2", "starlette", "alembic"}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_ml_imports_nothing_from_the_app_layer():
    offenders = {}
    files = list((ROOT / "ml").rglob("*.py"))
    assert files, "ml/ has no Python files"
    for path in files:
        bad = _imported_roots(path) & FORBIDDEN_IN_ML
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_nothing_is_unpickled_anywhere():
    """Artifacts are safetensors only: no pickle, torch.load or numpy allow_pickle in code."""
    patterns = ("pickle.load", "torch.load(", "allow_pickle=True", "joblib.load", "cloudpickle")
    hits = []
    for folder in ("ml", "app"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            hits += [f"{path.relative_to(ROOT)}: {p}" for p in patterns if p in text]
    assert hits == []


def test_the_detector_itself_catches_a_forbidden_import(tmp_path):
    sample = tmp_path / "bad.py"
    sample.write_text("import sqlalchemy\nfrom app.db import x\n")
    assert {"sqlalchemy", "app"} <= _imported_roots(sample)
