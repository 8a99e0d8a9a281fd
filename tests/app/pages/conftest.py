"""Page-test fixtures: the tiny workspace imported into a fresh database, and signed-in browsers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.models import Role
from app.services.workspace_import import import_workspace

from .helpers import sign_in
from .world import build_world

MODEL = "tiny-pcbm"


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny workspace on disk, written once; tests only read it."""
    return build_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def served(ctx, db, world_dir) -> str:
    """The tiny workspace imported into this test's database; returns the model's name."""
    import_workspace(db, ctx, world_dir, author=None)
    return MODEL


@pytest.fixture
def researcher(make_user):
    return make_user(Role.RESEARCHER, name="rita")


@pytest.fixture
def browser(client: TestClient, db, researcher) -> Callable[..., str]:
    """Sign ``client`` in as the researcher (once); returns the session's CSRF token."""
    return sign_in(client, db, researcher)
