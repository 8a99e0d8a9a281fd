"""IDOR: a signed-in user tries other users' ids on every object route.

The route matrix (tests/app/test_route_matrix.py) checks each role against each route,
with objects owned by an admin. Here the attacker has the *same* role as the victim and
owns an object of the same kind, which is how IDOR bugs hide: a researcher with a study
of their own opens, edits, invites to or exports another researcher's study; a
participant with a job of their own reads or cancels another participant's job; a user
revokes another user's token. Each attempt must answer 403 or 404 with a *valid* request
(a 422 would only say that validation ran before the ownership check), and the victim's
object must be unchanged afterwards.

Every path parameter of the app is classified below. A route with a parameter naming an
owned object must have an IDOR case here; a new parameter name fails
``test_every_path_parameter_is_classified`` until someone decides what it names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts

from app.models import ApiToken, Job, Role, User
from app.services import jobs as job_service
from app.services import users as user_service
from app.services.workspace_import import import_workspace

# Parameters that name something owned by one user (or study owner): IDOR-checked below.
OWNED_PARAMS = {"token_id", "job_id", "job", "user_id", "study_id", "study"}
# Parameters that name something every staff member shares by design (models, their
# versions): participants are refused by role (403 in the route matrix), staff may all see.
SHARED_PARAMS = {"model_id", "model", "number", "path"}

Builder = Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]
# (method, template) -> (attacker, request builder with the victim's ids)
IDOR: dict[tuple[str, str], tuple[str, Builder]] = {
    ("DELETE", "/api/v1/tokens/{token_id}"): ("researcher-b", lambda v: (f"/api/v1/tokens/{v['token']}", {})),
    ("GET", "/api/v1/jobs/{job_id}"): ("participant-b", lambda v: (f"/api/v1/jobs/{v['job']}", {})),
    ("POST", "/api/v1/jobs/{job_id}/cancel"): ("participant-b", lambda v: (f"/api/v1/jobs/{v['job']}/cancel", {})),
    ("GET", "/jobs/{job}"): ("participant-b", lambda v: (f"/jobs/{v['job']}", {})),
    ("GET", "/jobs/{job}/progress"): ("participant-b", lambda v: (f"/jobs/{v['job']}/progress", {})),
    ("GET", "/api/v1/users/{user_id}"): ("researcher-b", lambda v: (f"/api/v1/users/{v['user']}", {})),
    ("PATCH", "/api/v1/users/{user_id}"): (
        "researcher-b", lambda v: (f"/api/v1/users/{v['user']}", {"json": {"is_active": False}})),
    ("GET", "/api/v1/studies/{study_id}"): ("researcher-b", lambda v: (f"/api/v1/studies/{v['study']}", {})),
    ("PATCH", "/api/v1/studies/{study_id}"): (
        "researcher-b", lambda v: (f"/api/v1/studies/{v['draft']}", {"json": {"name": "hijacked"}})),
    ("POST", "/api/v1/studies/{study_id}/open"): (
        "researcher-b", lambda v: (f"/api/v1/studies/{v['draft']}/open", {})),
    ("POST", "/api/v1/studies/{study_id}/close"): (
        "researcher-b", lambda v: (f"/api/v1/studies/{v['study']}/close", {})),
    ("POST", "/api/v1/studies/{study_id}/invitations"): (
        "researcher-b", lambda v: (f"/api/v1/studies/{v['study']}/invitations", {"json": {"count": 1}})),
    ("GET", "/api/v1/studies/{study_id}/participants"): (
        "researcher-b", lambda v: (f"/api/v1/studies/{v['study']}/participants", {})),
    ("GET", "/api/v1/studies/{study_id}/results"): (
        "researcher-b", lambda v: (f"/api/v1/studies/{v['study']}/results", {})),
    ("GET", "/api/v1/studies/{study_id}/export"): (
        "researcher-b", lambda v: (f"/api/v1/studies/{v['study']}/export", {"params": {"format": "json"}})),
    ("GET", "/studies/{study}"): ("researcher-b", lambda v: (f"/studies/{v['study']}", {})),
    ("POST", "/studies/{study}/status"): (
        "researcher-b", lambda v: (f"/studies/{v['study']}/status", {"data": {"action": "close"}})),
    ("POST", "/studies/{study}/invitations"): (
        "researcher-b", lambda v: (f"/studies/{v['study']}/invitations", {"data": {"count": "1"}})),
}


def path_routes(app) -> dict[tuple[str, str], set[str]]:
    """``{(method, template): {parameter names}}`` of every route with a path parameter."""
    found: dict[tuple[str, str], set[str]] = {}
    for route in iter_route_contexts(app.routes):
        params = set(getattr(route, "param_convertors", None) or {})
        for method in getattr(route, "methods", None) or ():
            if params and method != "HEAD":
                found[(method, route.path)] = params
    return found


def test_every_path_parameter_is_classified(app):
    unknown = {f"{m} {t}: {sorted(p - OWNED_PARAMS - SHARED_PARAMS)}" for (m, t), p in path_routes(app).items()
               if p - OWNED_PARAMS - SHARED_PARAMS}
    assert unknown == set(), ("new path parameters: add them to OWNED_PARAMS (and IDOR cases) or to "
                              "SHARED_PARAMS (with the reason every staff member may see them)")


def test_every_owned_object_route_has_an_idor_case(app):
    owned = {route for route, params in path_routes(app).items() if params & OWNED_PARAMS}
    assert owned - set(IDOR) == set(), "object routes without an IDOR attempt: add them to IDOR"
    assert set(IDOR) - owned == set(), "IDOR lists routes that no longer exist"


@pytest.fixture
def victims(db, ctx, make_user, token_headers, tiny_workspace) -> tuple[dict[str, dict], dict[str, Any]]:
    """Two users of each role that owns things, each owning one object of each kind."""
    people = {name: make_user(role, name=name) for name, role in [
        ("researcher-a", Role.RESEARCHER), ("researcher-b", Role.RESEARCHER),
        ("participant-a", Role.PARTICIPANT), ("participant-b", Role.PARTICIPANT)]}
    headers = {name: token_headers(user) for name, user in people.items()}
    victim_token, _ = user_service.create_token(db, people["researcher-a"], "victim's")
    user_service.create_token(db, people["researcher-b"], "attacker's own")
    victim_job = job_service.create_job(db, "reliability-noop", user=people["participant-a"])
    job_service.create_job(db, "reliability-noop", user=people["participant-b"])
    ids = {"token": victim_token.id, "job": victim_job.id, "user": people["participant-a"].id}
    if _studies_available():
        ids |= _studies(db, ctx, people, tiny_workspace)
    return headers, ids


def _studies_available() -> bool:
    try:
        import app.services.studies  # noqa: F401
        import tests.app.study_helpers  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _studies(db, ctx, people, tiny_workspace) -> dict[str, int]:
    from tests.app.study_helpers import ALL_TOOLS, open_study

    model_id = import_workspace(db, ctx, tiny_workspace, author=None)[0]
    config = {"target_split": "test", "in_distribution_split": "val",
              "conditions": [{"name": "all", "tools": ALL_TOOLS}]}
    study = open_study(db, people["researcher-a"], model_id, **config)
    draft = open_study(db, people["researcher-a"], model_id, open_it=False, name="victim's draft", **config)
    open_study(db, people["researcher-b"], model_id, name="attacker's own", **config)
    return {"study": study.id, "draft": draft.id}


def snapshot(db, ids: dict[str, Any]) -> dict[str, Any]:
    """What an attack could change: the token, the job, the user, the studies and their invitations."""
    db.expire_all()
    token = db.get(ApiToken, ids["token"])
    job = db.get(Job, ids["job"])
    user = db.get(User, ids["user"])
    state = {"token": (token.revoked_at,), "job": (job.status, job.cancel_requested),
             "user": (user.role, user.is_active, user.password_hash)}
    if "study" in ids:
        from app.models_studies import Study

        for key in ("study", "draft"):
            study = db.get(Study, ids[key])
            state[key] = {column.name: getattr(study, column.key, None) for column in Study.__table__.columns}
        state["invitations"] = _invitation_count(db, ids["study"])
        assert state["invitations"] is not None, "cannot count the study's invitations: update _invitation_count"
    return state


def _invitation_count(db, study_id: int) -> int | None:
    from sqlalchemy import func, select

    import app.models_studies as tables

    invitation = getattr(tables, "StudyInvitation", None)
    if invitation is None:
        return None
    return db.scalar(select(func.count()).select_from(invitation).where(invitation.study_id == study_id))


def test_other_users_ids_are_refused_and_change_nothing(client, db, victims):
    headers, ids = victims
    before = snapshot(db, ids)
    wrong = []
    for (method, template), (attacker, build) in IDOR.items():
        if "{study" in template and "study" not in ids:
            continue  # studies are not part of this build
        url, kwargs = build(ids)
        response = client.request(method, url, headers=headers[attacker], follow_redirects=False, **kwargs)
        if response.status_code not in (403, 404):
            wrong.append(f"{method} {template} as {attacker}: {response.status_code} {response.text[:120]}")
    assert wrong == []
    assert snapshot(db, ids) == before
    # The owners read the same objects through the same routes: the refusals were about ownership.
    owners = {"participant-b": "participant-a", "researcher-b": "researcher-a"}
    for (method, template), (attacker, build) in IDOR.items():
        if method != "GET" or template.startswith("/api/v1/users/") or ("{study" in template and "study" not in ids):
            continue  # reading another user's account is an admin's right, not an owner's
        url, kwargs = build(ids)
        response = client.request(method, url, headers=headers[owners[attacker]], follow_redirects=False, **kwargs)
        assert response.status_code == 200, f"{template} as its owner: {response.status_code}"
