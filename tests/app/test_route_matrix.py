"""Every route's expected status for anonymous, participant, researcher and admin.

A route missing from ``MATRIX`` fails ``test_every_route_is_in_the_matrix``: adding a
route means deciding, here, who may call it. State-changing routes are called with an
empty body, so an allowed caller gets 422 (validation) and nothing changes, while a
refused one gets 401/403 before the body is even looked at.
"""

import pytest
from fastapi.routing import iter_route_contexts

from app.models import Role
from app.services import jobs
from app.services import users as user_service
from app.services.workspace_import import import_workspace

from .history_helpers import register_model
from .study_helpers import matrix_studies
from .workspace_helpers import tiny_backbone, tiny_workspace  # noqa: F401

ROLES = ("anonymous", "participant", "researcher", "admin")
ALL_200 = (200, 200, 200, 200)
SIGNED_IN = (401, 200, 200, 200)
STAFF = (401, 403, 200, 200)
ADMIN = (401, 403, 403, 200)
STAFF_POST = (401, 403, 422, 422)  # an empty body: staff get the validation error
_NO_FOLLOW = {"follow_redirects": False}
PAGE_SIGNED_IN = (303, 200, 200, 200)
PAGE_STAFF = (303, 403, 200, 200)
PAGE_UNSERVED = (303, 403, 409, 409)
PAGE_POST = (303, 403, 422, 422)  # an empty form: staff get the validation error page

# (method, path template) -> (request builder, expected status per role in ROLES order)
# A builder gets the ids made by the fixture and returns (url, kwargs for the request).
MATRIX = {
    ("GET", "/openapi.json"): (lambda ids: ("/openapi.json", {}), ALL_200),
    ("GET", "/docs"): (lambda ids: ("/docs", {}), ALL_200),
    ("GET", "/healthz"): (lambda ids: ("/healthz", {}), ALL_200),
    ("GET", "/readyz"): (lambda ids: ("/readyz", {}), ALL_200),
    ("GET", "/login/once"): (lambda ids: ("/login/once?token=not-a-link", {}), (401, 401, 401, 401)),
    ("POST", "/api/v1/auth/login"): (lambda ids: ("/api/v1/auth/login", {"json": {}}), (422, 422, 422, 422)),
    ("POST", "/api/v1/auth/logout"): (lambda ids: ("/api/v1/auth/logout", {}), SIGNED_IN),
    # bearer requests have no browser session, hence no CSRF token to hand out
    ("GET", "/api/v1/auth/session"): (lambda ids: ("/api/v1/auth/session", {}), (401, 401, 401, 401)),
    ("GET", "/api/v1/users/me"): (lambda ids: ("/api/v1/users/me", {}), SIGNED_IN),
    ("GET", "/api/v1/users"): (lambda ids: ("/api/v1/users", {}), ADMIN),
    ("POST", "/api/v1/users"): (lambda ids: ("/api/v1/users", {"json": {}}), (401, 403, 403, 422)),
    ("GET", "/api/v1/users/{user_id}"): (lambda ids: (f"/api/v1/users/{ids['user']}", {}), ADMIN),
    ("PATCH", "/api/v1/users/{user_id}"): (lambda ids: (f"/api/v1/users/{ids['user']}", {"json": {}}), ADMIN),
    ("GET", "/api/v1/tokens"): (lambda ids: ("/api/v1/tokens", {}), SIGNED_IN),
    ("POST", "/api/v1/tokens"): (lambda ids: ("/api/v1/tokens", {"json": {}}), (401, 422, 422, 422)),
    # someone else's token: not found for everyone signed in (no IDOR)
    ("DELETE", "/api/v1/tokens/{token_id}"): (lambda ids: (f"/api/v1/tokens/{ids['token']}", {}), (401, 404, 404, 404)),
    ("GET", "/api/v1/jobs"): (lambda ids: ("/api/v1/jobs", {}), SIGNED_IN),
    # the admin's job: hidden from participants, visible to staff
    ("GET", "/api/v1/jobs/{job_id}"): (lambda ids: (f"/api/v1/jobs/{ids['job']}", {}), (401, 404, 200, 200)),
    ("POST", "/api/v1/jobs/{job_id}/cancel"): (lambda ids: (f"/api/v1/jobs/{ids['job']}/cancel", {}), (401, 404, 409, 409)),
    ("GET", "/api/v1/models"): (lambda ids: ("/api/v1/models", {}), STAFF),
    ("POST", "/api/v1/models"): (lambda ids: ("/api/v1/models", {"json": {}}), STAFF_POST),
    ("GET", "/api/v1/datasets"): (lambda ids: ("/api/v1/datasets", {}), STAFF),
    ("POST", "/api/v1/datasets"): (lambda ids: ("/api/v1/datasets", {"json": {}}), STAFF_POST),
    ("GET", "/api/v1/banks"): (lambda ids: ("/api/v1/banks", {}), STAFF),
    ("POST", "/api/v1/banks"): (lambda ids: ("/api/v1/banks", {"json": {}}), STAFF_POST),
    ("GET", "/api/v1/models/{model_id}"): (lambda ids: (f"/api/v1/models/{ids['model']}", {}), STAFF),
    ("GET", "/api/v1/models/{model_id}/versions"): (lambda ids: (f"/api/v1/models/{ids['model']}/versions", {}), STAFF),
    ("GET", "/api/v1/models/{model_id}/versions/{number}"): (
        lambda ids: (f"/api/v1/models/{ids['model']}/versions/1", {}), STAFF),
    ("POST", "/api/v1/models/{model_id}/edits"): (
        lambda ids: (f"/api/v1/models/{ids['model']}/edits", {"json": {}}), (401, 403, 422, 422)),
    ("POST", "/api/v1/models/{model_id}/undo"): (
        lambda ids: (f"/api/v1/models/{ids['model']}/undo", {"json": {}}), (401, 403, 422, 422)),
    ("POST", "/api/v1/models/{model_id}/revert"): (
        lambda ids: (f"/api/v1/models/{ids['model']}/revert", {"json": {}}), (401, 403, 422, 422)),
    ("GET", "/api/v1/models/{model_id}/diff"): (
        lambda ids: (f"/api/v1/models/{ids['model']}/diff?from_version=1&to_version=1", {}), STAFF),
    # inspecting a served model: "served" is imported from a workspace (ids["image"] is one of its images)
    ("GET", "/api/v1/models/{model_id}/concepts"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/concepts?class=cat", {}), STAFF),
    ("GET", "/api/v1/models/{model_id}/matrix"): (lambda ids: (f"/api/v1/models/{ids['served']}/matrix", {}), STAFF),
    ("POST", "/api/v1/models/{model_id}/preview"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/preview", {"json": {}}), (401, 403, 422, 422)),
    ("GET", "/api/v1/models/{model_id}/images"): (lambda ids: (f"/api/v1/models/{ids['served']}/images", {}), STAFF),
    ("GET", "/api/v1/models/{model_id}/images/detail"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/images/detail?id={ids['image']}", {}), STAFF),
    ("GET", "/api/v1/models/{model_id}/images/file"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/images/file?id={ids['image']}", {}), STAFF),
    ("POST", "/api/v1/models/{model_id}/images/whatif"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/images/whatif", {"json": {}}), (401, 403, 422, 422)),
    ("POST", "/api/v1/models/{model_id}/predict"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/predict", {}), (401, 403, 422, 422)),
    # concept maps and metrics (the tiny workspace has no annotations: metrics say "unavailable", 200)
    ("GET", "/api/v1/models/{model_id}/images/maps"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/images/maps?id={ids['image']}&concepts=water", {}), STAFF),
    ("POST", "/api/v1/models/{model_id}/maps"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/maps?concepts=water", {}), (401, 403, 422, 422)),
    ("GET", "/api/v1/models/{model_id}/concept-metrics"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/concept-metrics", {}), STAFF),
    ("POST", "/api/v1/models/{model_id}/suggestions"): (
        lambda ids: (f"/api/v1/models/{ids['served']}/suggestions", {"json": {}}), (401, 403, 422, 422)),
    # -- HTML pages (app/routes/pages). Signed-out visitors are sent to the login page (303);
    # bearer requests need no CSRF token. "birds" is registered but not imported from a
    # workspace, so pages that need the served model answer 409 (not servable) to staff.
    ("GET", "/login"): (lambda ids: ("/login", _NO_FOLLOW), (200, 303, 303, 303)),
    ("POST", "/login"): (lambda ids: ("/login", {"data": {}, **_NO_FOLLOW}), (403, 403, 403, 403)),
    ("POST", "/logout"): (lambda ids: ("/logout", _NO_FOLLOW), (303, 303, 303, 303)),
    ("GET", "/"): (lambda ids: ("/", _NO_FOLLOW), PAGE_SIGNED_IN),
    ("GET", "/images"): (lambda ids: ("/images", _NO_FOLLOW), (303, 403, 303, 303)),
    ("GET", "/concepts"): (lambda ids: ("/concepts", _NO_FOLLOW), (303, 403, 303, 303)),
    ("GET", "/build"): (lambda ids: ("/build", _NO_FOLLOW), PAGE_STAFF),
    ("POST", "/build/dataset"): (lambda ids: ("/build/dataset", _NO_FOLLOW), PAGE_POST),
    ("POST", "/build/bank"): (lambda ids: ("/build/bank", _NO_FOLLOW), PAGE_POST),
    ("POST", "/build/model"): (lambda ids: ("/build/model", _NO_FOLLOW), PAGE_POST),
    ("GET", "/jobs"): (lambda ids: ("/jobs", _NO_FOLLOW), (303, 303, 303, 303)),
    ("GET", "/jobs/{job}"): (lambda ids: (f"/jobs/{ids['job']}", _NO_FOLLOW), (303, 404, 200, 200)),
    ("GET", "/jobs/{job}/progress"): (lambda ids: (f"/jobs/{ids['job']}/progress", _NO_FOLLOW), (303, 404, 200, 200)),
    ("GET", "/models/{model}"): (lambda ids: ("/models/birds", _NO_FOLLOW), PAGE_UNSERVED),
    ("GET", "/models/{model}/concepts"): (lambda ids: ("/models/birds/concepts", _NO_FOLLOW), PAGE_UNSERVED),
    ("POST", "/models/{model}/preview"): (lambda ids: ("/models/birds/preview", _NO_FOLLOW), PAGE_POST),
    ("POST", "/models/{model}/commit"): (lambda ids: ("/models/birds/commit", _NO_FOLLOW), PAGE_POST),
    ("POST", "/models/{model}/undo"): (lambda ids: ("/models/birds/undo", _NO_FOLLOW), PAGE_POST),
    ("GET", "/models/{model}/history"): (lambda ids: ("/models/birds/history", _NO_FOLLOW), PAGE_STAFF),
    ("GET", "/models/{model}/diff"): (lambda ids: ("/models/birds/diff?a=1&b=1", _NO_FOLLOW), PAGE_STAFF),
    ("POST", "/models/{model}/revert"): (lambda ids: ("/models/birds/revert", _NO_FOLLOW), PAGE_POST),
    ("GET", "/models/{model}/images"): (lambda ids: ("/models/birds/images", _NO_FOLLOW), PAGE_UNSERVED),
    ("GET", "/models/{model}/images/grid"): (lambda ids: ("/models/birds/images/grid", _NO_FOLLOW), PAGE_UNSERVED),
    ("GET", "/models/{model}/images/view"): (lambda ids: ("/models/birds/images/view?id=a.png", _NO_FOLLOW),
                                             PAGE_UNSERVED),
    ("GET", "/models/{model}/images/file"): (lambda ids: ("/models/birds/images/file?id=a.png", _NO_FOLLOW),
                                             PAGE_UNSERVED),
    ("GET", "/models/{model}/images/overlay"): (lambda ids: ("/models/birds/images/overlay?id=a.png", _NO_FOLLOW),
                                                PAGE_UNSERVED),
    ("GET", "/models/{model}/images/overlay.png"): (
        lambda ids: ("/models/birds/images/overlay.png?id=a.png", _NO_FOLLOW), PAGE_UNSERVED),
    ("GET", "/models/{model}/images/whatif"): (
        lambda ids: ("/models/birds/images/whatif?id=a.png&concept=water&score=1", _NO_FOLLOW), PAGE_UNSERVED),
    ("GET", "/models/{model}/images/upload"): (lambda ids: ("/models/birds/images/upload", _NO_FOLLOW), PAGE_STAFF),
    ("POST", "/models/{model}/images/upload"): (lambda ids: ("/models/birds/images/upload", _NO_FOLLOW),
                                                (303, 403, 422, 422)),
    ("GET", "/models/{model}/bank"): (lambda ids: ("/models/birds/bank", _NO_FOLLOW), PAGE_STAFF),
    ("GET", "/models/{model}/suggestions"): (lambda ids: ("/models/birds/suggestions", _NO_FOLLOW), PAGE_UNSERVED),
    ("POST", "/models/{model}/suggestions/apply"): (lambda ids: ("/models/birds/suggestions/apply", _NO_FOLLOW),
                                                    PAGE_POST),
}


# -- user studies (app/routes/api/studies.py, app/routes/pages/studies.py and participate.py). The
# world's study is open and belongs to "owner" (an admin), so another researcher gets 404 for it;
# /studies/me and /participate act on the caller's own participation: 404 for a participant in
# no study, 403 for staff. State-changing calls are made so that nothing changes (empty bodies,
# a stale version, a draft study to close).
_Q = {"concept": "feathers"}
PARTICIPANT_ONLY = (401, 404, 403, 403)
PAGE_PARTICIPANT_ONLY = (303, 404, 403, 403)
STUDY_MATRIX = {
    ("GET", "/api/v1/studies"): (lambda ids: ("/api/v1/studies", {}), STAFF),
    ("POST", "/api/v1/studies"): (lambda ids: ("/api/v1/studies", {"json": {}}), (401, 403, 422, 422)),
    ("GET", "/api/v1/studies/{study_id}"): (lambda ids: (f"/api/v1/studies/{ids['study']}", {}), (401, 403, 404, 200)),
    ("PATCH", "/api/v1/studies/{study_id}"): (
        lambda ids: (f"/api/v1/studies/{ids['study']}", {"json": {}}), (401, 403, 404, 409)),
    ("POST", "/api/v1/studies/{study_id}/open"): (
        lambda ids: (f"/api/v1/studies/{ids['study']}/open", {}), (401, 403, 404, 200)),
    ("POST", "/api/v1/studies/{study_id}/close"): (
        lambda ids: (f"/api/v1/studies/{ids['study_to_close']}/close", {"json": {"note": "done"}}),
        (401, 403, 404, 200)),
    ("POST", "/api/v1/studies/{study_id}/invitations"): (
        lambda ids: (f"/api/v1/studies/{ids['study']}/invitations", {"json": {}}), (401, 403, 422, 422)),
    ("GET", "/api/v1/studies/{study_id}/participants"): (
        lambda ids: (f"/api/v1/studies/{ids['study']}/participants", {}), (401, 403, 404, 200)),
    ("GET", "/api/v1/studies/{study_id}/results"): (
        lambda ids: (f"/api/v1/studies/{ids['study']}/results", {}), (401, 403, 404, 200)),
    ("GET", "/api/v1/studies/{study_id}/export"): (
        lambda ids: (f"/api/v1/studies/{ids['study']}/export?format=json", {}), (401, 403, 404, 200)),
    ("POST", "/api/v1/studies/join"): (lambda ids: ("/api/v1/studies/join", {"json": {}}), (422, 422, 422, 422)),
    ("GET", "/api/v1/studies/me"): (lambda ids: ("/api/v1/studies/me", {}), PARTICIPANT_ONLY),
    ("GET", "/api/v1/studies/me/concepts"): (lambda ids: ("/api/v1/studies/me/concepts", {}), PARTICIPANT_ONLY),
    ("GET", "/api/v1/studies/me/concept"): (
        lambda ids: ("/api/v1/studies/me/concept", {"params": _Q}), PARTICIPANT_ONLY),
    ("GET", "/api/v1/studies/me/examples"): (
        lambda ids: ("/api/v1/studies/me/examples", {"params": _Q}), PARTICIPANT_ONLY),
    ("GET", "/api/v1/studies/me/images/file"): (
        lambda ids: ("/api/v1/studies/me/images/file", {"params": {"id": ids["study_image"]}}), PARTICIPANT_ONLY),
    ("GET", "/api/v1/studies/me/suggestions"): (lambda ids: ("/api/v1/studies/me/suggestions", {}), PARTICIPANT_ONLY),
    ("POST", "/api/v1/studies/me/preview"): (lambda ids: ("/api/v1/studies/me/preview", {"json": {}}),
                                             PARTICIPANT_ONLY),
    ("POST", "/api/v1/studies/me/edits"): (lambda ids: ("/api/v1/studies/me/edits", {"json": {}}), PARTICIPANT_ONLY),
    ("POST", "/api/v1/studies/me/undo"): (lambda ids: ("/api/v1/studies/me/undo", {"json": {}}), PARTICIPANT_ONLY),
    ("POST", "/api/v1/studies/me/submit"): (
        lambda ids: ("/api/v1/studies/me/submit", {"json": {"version": 999}}), PARTICIPANT_ONLY),
    ("GET", "/studies"): (lambda ids: ("/studies", _NO_FOLLOW), (303, 303, 200, 200)),
    ("POST", "/studies"): (lambda ids: ("/studies", _NO_FOLLOW), PAGE_POST),
    ("GET", "/studies/new"): (lambda ids: ("/studies/new", _NO_FOLLOW), PAGE_STAFF),
    ("GET", "/studies/{study}"): (lambda ids: (f"/studies/{ids['study']}", _NO_FOLLOW), (303, 403, 404, 200)),
    ("POST", "/studies/{study}/status"): (lambda ids: (f"/studies/{ids['study']}/status", _NO_FOLLOW), PAGE_POST),
    ("POST", "/studies/{study}/invitations"): (
        lambda ids: (f"/studies/{ids['study']}/invitations", _NO_FOLLOW), PAGE_POST),
    ("GET", "/join"): (lambda ids: ("/join?code=not-a-code", _NO_FOLLOW), (404, 404, 404, 404)),
    ("POST", "/join"): (lambda ids: ("/join", _NO_FOLLOW), (403, 403, 403, 403)),
    ("GET", "/participate"): (lambda ids: ("/participate", _NO_FOLLOW), PAGE_PARTICIPANT_ONLY),
    ("GET", "/participate/status"): (lambda ids: ("/participate/status", _NO_FOLLOW), PAGE_PARTICIPANT_ONLY),
    ("GET", "/participate/class"): (lambda ids: ("/participate/class", _NO_FOLLOW), PAGE_PARTICIPANT_ONLY),
    ("GET", "/participate/concept"): (
        lambda ids: ("/participate/concept", {"params": _Q, **_NO_FOLLOW}), PAGE_PARTICIPANT_ONLY),
    ("GET", "/participate/examples"): (
        lambda ids: ("/participate/examples", {"params": _Q, **_NO_FOLLOW}), PAGE_PARTICIPANT_ONLY),
    ("GET", "/participate/image"): (
        lambda ids: ("/participate/image", {"params": {"id": ids["study_image"]}, **_NO_FOLLOW}),
        PAGE_PARTICIPANT_ONLY),
    ("GET", "/participate/suggestions"): (lambda ids: ("/participate/suggestions", _NO_FOLLOW), PAGE_PARTICIPANT_ONLY),
    ("POST", "/participate/preview"): (lambda ids: ("/participate/preview", _NO_FOLLOW), PAGE_PARTICIPANT_ONLY),
    ("POST", "/participate/commit"): (lambda ids: ("/participate/commit", _NO_FOLLOW), PAGE_PARTICIPANT_ONLY),
    ("POST", "/participate/undo"): (lambda ids: ("/participate/undo", _NO_FOLLOW), PAGE_PARTICIPANT_ONLY),
    ("POST", "/participate/submit"): (lambda ids: ("/participate/submit", _NO_FOLLOW), PAGE_PARTICIPANT_ONLY),
}
MATRIX.update(STUDY_MATRIX)
# The same routes for a participant of the world's study and for one of another researcher's
# study: neither reaches a study's configuration or results; each works on their own model only.
STUDY_PARTICIPANTS = ("study participant", "participant of another study")
_OWN_WORK = (200, 200)
STUDY_PARTICIPANT_STATUS = {route: (403, 403) for route in STUDY_MATRIX} | {
    ("POST", "/api/v1/studies/join"): (422, 422),
    ("POST", "/api/v1/studies/me/preview"): (422, 422),
    ("POST", "/api/v1/studies/me/edits"): (422, 422),
    ("POST", "/api/v1/studies/me/undo"): (422, 422),
    ("POST", "/api/v1/studies/me/submit"): (409, 409),
    ("GET", "/studies"): (303, 303),
    ("GET", "/join"): (404, 404),
    ("POST", "/participate/preview"): (422, 422),
    ("POST", "/participate/commit"): (422, 422),
    ("POST", "/participate/undo"): (422, 422),
    ("POST", "/participate/submit"): (422, 422),
} | {route: _OWN_WORK for route in STUDY_MATRIX
     if route[0] == "GET" and (route[1].startswith("/api/v1/studies/me") or route[1].startswith("/participate"))}

def app_routes(app) -> set[tuple[str, str]]:
    routes = set()
    for route in iter_route_contexts(app.routes):
        for method in route.methods or ():
            if method != "HEAD":
                routes.add((method, route.path))
    return routes


def test_every_route_is_in_the_matrix(app):
    routes = app_routes(app)
    assert routes - set(MATRIX) == set(), "new routes: decide who may call them and add them to MATRIX"
    assert set(MATRIX) - routes == set(), "MATRIX lists routes that no longer exist"


@pytest.fixture
def world(db, ctx, make_user, token_headers, tiny_workspace):
    headers = {"anonymous": {}}
    users = {}
    for role in ROLES[1:]:
        users[role] = make_user(Role(role))
        headers[role] = token_headers(users[role])
    owner = make_user(Role.ADMIN, name="owner")
    token, _ = user_service.create_token(db, owner, "owner's")
    job = jobs.create_job(db, "embed", user=owner)
    jobs.request_cancel(db, job.id, user=owner)  # finished: cancelling again is a harmless 409
    model = register_model(db, ctx.artifacts, author=owner)
    served = import_workspace(db, ctx, tiny_workspace, author=owner)[0]
    image = ctx.models.get(served).splits["test"].image_ids[0]
    study_ids = matrix_studies(db, ctx, owner, served, make_user)
    headers.update(study_ids.pop("headers"))
    return headers, {"user": owner.id, "token": token.id, "job": job.id, "model": model.id, "served": served,
                     "image": image, **study_ids}


def test_every_route_answers_each_role_as_expected(client, world):
    headers, ids = world
    wrong = []
    for (method, template), (build, expected) in MATRIX.items():
        url, kwargs = build(ids)
        for role, status in zip(ROLES, expected, strict=False):
            got = client.request(method, url, headers=headers[role], **kwargs).status_code
            if got != status:
                wrong.append(f"{method} {template} as {role}: {got}, expected {status}")
    assert wrong == []


def test_study_routes_answer_participants_of_each_study_as_expected(client, world):
    """A participant of the world's study and one of another study, on every study route."""
    headers, ids = world
    assert set(STUDY_PARTICIPANT_STATUS) == set(STUDY_MATRIX)
    wrong = []
    for route, expected in STUDY_PARTICIPANT_STATUS.items():
        build, _ = MATRIX[route]
        url, kwargs = build(ids)
        for who, status in zip(STUDY_PARTICIPANTS, expected, strict=False):
            got = client.request(route[0], url, headers=headers[who], **kwargs).status_code
            if got != status:
                wrong.append(f"{route[0]} {route[1]} as {who}: {got}, expected {status}")
    assert wrong == []
