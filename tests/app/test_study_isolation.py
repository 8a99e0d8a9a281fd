"""A participant reaches their own task and model and nothing else, by token or by cookie.

Two researchers run a study each on the same base model; "alice" and "bob" take part in
the first, "carol" in the second. Every route of the app that is not a participant's own
(their study workspace, their session, public pages) is called with alice's credentials
and the ids of everything that is not hers: bob's and carol's models, both studies, the
base model, the owner's user, token and job. Each call must be refused with 403 or 404.
A route added later is checked automatically; routes a participant may use are listed.
"""

from __future__ import annotations

import json
import re

import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient

from app.models import Model, Role
from app.services import history, jobs, studies
from app.services import users as user_service

from .pages.helpers import hidden_value
from .study_helpers import join, open_study, served_model, study_world_dir  # noqa: F401

# Routes a participant may call: public ones, their own session and tokens, and their study.
OWN = {
    ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/healthz"),
    ("GET", "/readyz"), ("GET", "/login/once"), ("POST", "/api/v1/auth/login"), ("POST", "/api/v1/auth/logout"),
    ("GET", "/api/v1/auth/session"), ("GET", "/api/v1/users/me"), ("GET", "/api/v1/tokens"),
    ("POST", "/api/v1/tokens"), ("GET", "/api/v1/jobs"), ("GET", "/login"), ("POST", "/login"), ("POST", "/logout"),
    ("GET", "/"), ("GET", "/jobs"), ("GET", "/studies"), ("GET", "/join"), ("POST", "/join"),
    ("POST", "/api/v1/studies/join"),
}
REFUSED = {403, 404}
PARAM = re.compile(r"{(\w+)}")


def is_own(method: str, path: str) -> bool:
    return (method, path) in OWN or path.startswith("/api/v1/studies/me") or path.startswith("/participate")


def routes(app) -> list[tuple[str, str]]:
    found = []
    for route in iter_route_contexts(app.routes):
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                found.append((method, route.path))
    return sorted(set(found))


@pytest.fixture
def people(client, db, ctx, make_user, study_world_dir):
    base = served_model(db, ctx, study_world_dir)
    rita, sam = make_user(Role.RESEARCHER, name="rita"), make_user(Role.RESEARCHER, name="sam")
    admin = make_user(Role.ADMIN, name="root")
    tools = [{"name": "all", "tools": ["weights", "maps", "preview", "suggestions"]}]
    first = open_study(db, rita, base, conditions=tools)
    second = open_study(db, sam, base, conditions=tools, name="second")
    alice, alice_user, alice_headers = join(db, ctx, rita, first.id)
    bob, _, bob_headers = join(db, ctx, rita, first.id)
    carol, _, carol_headers = join(db, ctx, sam, second.id)
    token, _ = user_service.create_token(db, admin, "admin's")
    job = jobs.create_job(db, "embed", user=admin)
    models = {p.pseudonym: db.get(Model, p.model_id) for p in (bob, carol)}
    return {
        "base": db.get(Model, base), "studies": (first, second), "alice": alice, "alice_user": alice_user,
        "bob": bob, "carol": carol, "headers": {"alice": alice_headers, "bob": bob_headers, "carol": carol_headers},
        "victims": {
            "model_id": [base, *(m.id for m in models.values())],
            "model": [db.get(Model, base).name, *(m.name for m in models.values())],
            "study_id": [first.id, second.id], "study": [first.id, second.id], "number": [1],
            "user_id": [admin.id, bob.user_id], "token_id": [token.id], "job_id": [job.id], "job": [job.id],
        },
    }


def urls(path: str, victims: dict) -> list[str]:
    """``path`` with its parameters filled in every way the victims allow."""
    names = PARAM.findall(path)
    if not names:
        return [path]
    filled = [path]
    for name in names:
        filled = [p.replace("{" + name + "}", str(value), 1) for p in filled for value in victims[name]]
    return filled


# Bodies a careless route would act on; an authorised caller would get 2xx with them.
BODIES = {
    "edits": {"base_version": 1, "edits": [{"op": "prune", "concept": "water", "class_name": "bird"}]},
    "undo": {"base_version": 2}, "revert": {"base_version": 2, "to_version": 1},
    "preview": {"base_version": 1, "edits": [{"op": "prune", "concept": "water"}]},
    "invitations": {"count": 1}, "users": {"name": "mallory", "role": "admin"},
}


def _call(client, method, url, headers, **extra):
    last = url.rstrip("/").rsplit("/", 1)[-1]
    if method == "PATCH" and "/users/" in url:
        kwargs = {"json": {"role": "admin"}}
    elif method == "PATCH":
        kwargs = {"json": {"task": "changed by a participant"}}
    elif method in ("POST", "DELETE"):
        kwargs = {"json": BODIES.get(last, {})}
    else:
        kwargs = {}
    return client.request(method, url, headers=headers, follow_redirects=False, **kwargs, **extra)


def test_the_table_of_own_routes_names_real_routes(app):
    assert OWN - set(routes(app)) <= {("GET", "/docs/oauth2-redirect")}


def test_a_participants_token_reaches_nothing_that_is_not_theirs(client, people):
    wrong = []
    for method, path in routes(client.app):
        if is_own(method, path):
            continue
        for url in urls(path, people["victims"]):
            status = _call(client, method, url, people["headers"]["alice"]).status_code
            if status not in REFUSED:
                wrong.append(f"{method} {url}: {status}")
    assert wrong == []


def test_a_participants_browser_session_reaches_nothing_that_is_not_theirs(client, db, people):
    study = people["studies"][0]
    code = studies.create_invitations(db, user_service.get_user(db, study.owner_id), study.id, 1)[0]
    page = client.get(studies.join_path(code))
    joined = client.post("/join", data={"csrf_token": hidden_value(page.text, "csrf_token"), "code": code,
                                        "consent": "yes"}, follow_redirects=False)
    assert joined.status_code == 303
    csrf = {"X-CSRF-Token": client.get("/api/v1/auth/session").json()["csrf_token"]}
    wrong = []
    for method, path in routes(client.app):
        if is_own(method, path):
            continue
        for url in urls(path, people["victims"]):
            status = _call(client, method, url, csrf if method != "GET" else {}).status_code
            if status not in REFUSED:
                wrong.append(f"{method} {url}: {status}")
    assert wrong == []
    # without the CSRF token a state-changing request is refused before it does anything
    assert client.post("/participate/commit", data={"base_version": 1, "prune": "water", "class": "bird"}
                       ).status_code == 403


def test_own_work_never_touches_anyone_elses_model(client, db, people):
    alice = people["headers"]["alice"]
    others = {p.pseudonym: db.get(Model, p.model_id).head_number for p in (people["bob"], people["carol"])}
    base_head = people["base"].head_number
    prune = {"base_version": 1, "prunes": [{"concept": "water", "class_name": "bird"}]}
    assert client.post("/api/v1/studies/me/edits", headers=alice, json=prune).status_code == 201
    assert client.post("/api/v1/studies/me/undo", headers=alice, json={"base_version": 2}).status_code == 201
    assert client.post("/api/v1/studies/me/submit", headers=alice, json={}).status_code == 200
    db.rollback()  # a fresh read transaction sees the commits
    assert {p.pseudonym: db.get(Model, p.model_id).head_number for p in (people["bob"], people["carol"])} == others
    assert db.get(Model, people["base"].id).head_number == base_head
    assert history.get_model(db, people["alice"].model_id).head_number == 3
    # bob and carol still work as before
    for name in ("bob", "carol"):
        assert client.post("/api/v1/studies/me/edits", headers=people["headers"][name], json=prune).status_code == 201


def test_what_a_participant_sees_is_their_task_and_nothing_of_the_set_up(client, db, ctx, people):
    first = people["studies"][0]
    alice = people["headers"]["alice"]
    seen = [client.get("/api/v1/studies/me", headers=alice).text,
            client.get("/api/v1/studies/me/concepts", headers=alice, params={"class": "bird"}).text,
            client.get("/api/v1/studies/me/examples", headers=alice, params={"concept": "water"}).text,
            client.get("/api/v1/studies/me/suggestions", headers=alice).text,
            client.post("/api/v1/studies/me/preview", headers=alice,
                        json={"base_version": 1, "prunes": [{"concept": "water", "class_name": "bird"}]}).text,
            client.get("/participate", headers=alice).text]
    target_images = ctx.models.get(people["base"].id).splits[first.target_split].image_ids
    for text in seen:
        assert first.target_split not in text  # never the held-out split, by name ...
        assert not any(image in text for image in target_images)  # ... or by its images
        assert people["bob"].pseudonym not in text and people["carol"].pseudonym not in text
        assert "conditions" not in text and first.consent_text not in text
    assert json.loads(seen[0])["pseudonym"] == people["alice"].pseudonym
    hidden = target_images[0]
    assert client.get("/api/v1/studies/me/images/file", headers=alice, params={"id": hidden}).status_code == 404
    assert client.get("/participate/image", headers=alice, params={"id": hidden}).status_code == 404


def test_another_studys_participant_works_in_their_own_study(client, people):
    carol = client.get("/api/v1/studies/me", headers=people["headers"]["carol"]).json()
    assert carol["study"]["name"] == "second" and carol["pseudonym"] == people["carol"].pseudonym


def test_every_study_of_the_app_is_covered(client):
    """The route walk above saw every study route that is not a participant's own."""
    study_routes = [r for r in routes(client.app) if "/studies" in r[1] and not is_own(*r)]
    assert len(study_routes) >= 10


@pytest.mark.postgres
def test_joining_and_editing_on_postgresql(pg_url, workspace, study_world_dir):
    """The same flow on PostgreSQL: joins balance conditions, edits stay on the participant's copy."""
    from app.main import create_app

    from .conftest import make_settings

    app = create_app(make_settings(workspace, database_url=pg_url))
    with TestClient(app) as client:
        ctx = app.state.ctx
        db = ctx.session_factory()
        try:
            owner = user_service.create_user(db, "rita", Role.RESEARCHER)
            base = served_model(db, ctx, study_world_dir)
            study = open_study(db, owner, base)
            joined = [join(db, ctx, owner, study.id) for _ in range(4)]
            assert sorted(p.condition for p, _, _ in joined) == ["full", "full", "weights only", "weights only"]
            headers = joined[0][2]
            prune = {"base_version": 1, "prunes": [{"concept": "water", "class_name": "bird"}]}
            assert client.post("/api/v1/studies/me/edits", headers=headers, json=prune).status_code == 201
            assert client.post("/api/v1/studies/me/submit", headers=headers, json={}).status_code == 200
            staff = {"Authorization": "Bearer " + user_service.create_token(db, owner, "t")[1]}
            bundle = client.get(f"/api/v1/studies/{study.id}/export", headers=staff, params={"format": "json"}).json()
            assert [e["kind"] for e in bundle["tables"]["events"]].count("join") == 4
            assert bundle["tables"]["submissions"][0]["prunes"] == [{"class_name": "bird", "concept": "water"}]
        finally:
            db.close()
