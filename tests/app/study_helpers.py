"""Setting up studies in tests: a served base model, an open study, participants who joined it.

``study_world`` is the page-test world (tests/app/pages/world.py: birds seen on water, a
shifted split where the background flips), so a study on it has a known answer: pruning
"water" for "bird" fixes the shifted split. Import the fixture with
``from .study_helpers import study_world_dir  # noqa: F401``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.models import Role, User
from app.services import studies
from app.services import users as user_service
from app.services.workspace_import import import_workspace
from tests.app.pages.world import build_world

ALL_TOOLS = ["weights", "maps", "preview", "suggestions"]


@pytest.fixture(scope="session")
def study_world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_world(tmp_path_factory.mktemp("study-world"))


def served_model(db, ctx, world: Path) -> int:
    """Import the world's workspace; returns the id of its model ("tiny-pcbm")."""
    return import_workspace(db, ctx, world, author=None)[0]


def open_study(db, owner: User, model_id: int, *, open_it: bool = True, **config: Any):
    values = {"name": "Fix the birds", "base_model_id": model_id,
              "task": "Make the model work when backgrounds change.",
              "consent_text": "You agree that your actions are logged.", "edit_budget": 3,
              "conditions": [{"name": "full", "tools": ALL_TOOLS}, {"name": "weights only", "tools": []}]} | config
    study = studies.create_study(db, owner, **values)
    if open_it:
        study = studies.open_study(db, owner, study.id)
    return study


def join(db, ctx, owner: User, study_id: int) -> tuple[Any, User, dict[str, str]]:
    """One participant through a fresh invitation: (participant, user, bearer headers)."""
    code = studies.create_invitations(db, owner, study_id, 1)[0]
    participant, user = studies.join(db, ctx.artifacts, code, consent=True)
    _, token = user_service.create_token(db, user, "test")
    return participant, user, {"Authorization": f"Bearer {token}"}


def matrix_studies(db, ctx, owner: User, model_id: int, make_user) -> dict[str, Any]:
    """For the route matrix: an open study of ``owner`` on the tiny workspace's model (splits
    train/val/test), a draft one to close, and two participants: one in the open study, one in
    a study of another researcher."""
    config = {"target_split": "test", "in_distribution_split": "val",
              "conditions": [{"name": "all", "tools": ALL_TOOLS}]}
    study = open_study(db, owner, model_id, **config)
    to_close = open_study(db, owner, model_id, open_it=False, name="to close", **config)
    other_owner = make_user(Role.RESEARCHER, name="other-researcher")
    other = open_study(db, other_owner, model_id, name="another study", **config)
    own, _, own_headers = join(db, ctx, owner, study.id)
    _, _, other_headers = join(db, ctx, other_owner, other.id)
    image = ctx.models.get(model_id).splits["val"].image_ids[0]
    return {"study": study.id, "study_to_close": to_close.id, "other_study": other.id, "study_image": image,
            "headers": {"study participant": own_headers, "participant of another study": other_headers}}
