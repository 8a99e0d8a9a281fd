"""/api/v1/models: one class per endpoint, permission cases as methods."""

import pytest

from .history_helpers import register_model

BASE = "/api/v1/models"


@pytest.fixture
def model(db, ctx):
    return register_model(db, ctx.artifacts, author=None)


@pytest.fixture
def researcher(as_role):
    return as_role("researcher")


def commit(client, headers, model_id, base, concept="water", **extra):
    body = {"base_version": base, "edits": [{"op": "prune", "concept": concept}], **extra}
    return client.post(f"{BASE}/{model_id}/edits", json=body, headers=headers)


class TestListModels:
    @pytest.mark.parametrize("role", ["researcher", "admin"])
    def test_staff_list_models(self, client, model, as_role, role):
        body = client.get(BASE, headers=as_role(role)).json()
        assert [(m["name"], m["head_version"]) for m in body] == [("birds", 1)]

    def test_participant_is_forbidden(self, client, model, as_role):
        assert client.get(BASE, headers=as_role("participant")).status_code == 403

    def test_anonymous_is_401(self, client, model):
        assert client.get(BASE).status_code == 401


class TestGetModel:
    def test_found(self, client, model, researcher):
        body = client.get(f"{BASE}/{model.id}", headers=researcher).json()
        assert body["kind"] == "pcbm" and body["head_version"] == 1

    def test_unknown_is_404(self, client, researcher):
        assert client.get(f"{BASE}/99", headers=researcher).status_code == 404


class TestListVersions:
    def test_lists_the_chain(self, client, model, researcher):
        commit(client, researcher, model.id, 1)
        body = client.get(f"{BASE}/{model.id}/versions", headers=researcher).json()
        assert [v["number"] for v in body] == [1, 2]
        assert body[0]["edit"] == {"op": "initial"} and body[1]["parent_id"] == body[0]["id"]
        assert body[0]["metrics"] == {"test": {"accuracy": 0.75}}

    def test_unknown_model_is_404(self, client, researcher):
        assert client.get(f"{BASE}/99/versions", headers=researcher).status_code == 404


class TestGetVersion:
    def test_found_and_missing(self, client, model, researcher):
        assert client.get(f"{BASE}/{model.id}/versions/1", headers=researcher).json()["number"] == 1
        assert client.get(f"{BASE}/{model.id}/versions/2", headers=researcher).status_code == 404


class TestCommitEdit:
    def test_creates_the_next_version(self, client, model, researcher):
        response = commit(client, researcher, model.id, 1, message="drop the water shortcut")
        assert response.status_code == 201
        body = response.json()
        assert body["number"] == 2 and body["message"] == "drop the water shortcut"
        assert body["edit"]["records"][0]["after"] == [0.0, 0.0, 0.0]
        assert client.get(f"{BASE}/{model.id}", headers=researcher).json()["head_version"] == 2

    def test_a_stale_base_version_is_409_with_the_current_version(self, client, model, researcher):
        commit(client, researcher, model.id, 1)
        response = commit(client, researcher, model.id, 1, concept="grass")
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "version_conflict"
        assert error["detail"]["current_version"]["number"] == 2
        assert [v["number"] for v in client.get(f"{BASE}/{model.id}/versions", headers=researcher).json()] == [1, 2]

    def test_an_unknown_concept_is_422_naming_it(self, client, model, researcher):
        response = commit(client, researcher, model.id, 1, concept="wings")
        assert response.status_code == 422 and "wings" in response.json()["error"]["message"]

    def test_malformed_edits_are_422(self, client, model, researcher):
        for body in [{"base_version": 1, "edits": []},
                     {"base_version": 1, "edits": [{"op": "explode", "concept": "water"}]},
                     {"base_version": 0, "edits": [{"op": "prune", "concept": "water"}]},
                     {"base_version": 1, "edits": [{"op": "scale", "concept": "water", "value": "NaN"}]}]:
            assert client.post(f"{BASE}/{model.id}/edits", json=body, headers=researcher).status_code == 422

    def test_participant_is_forbidden(self, client, model, as_role):
        assert commit(client, as_role("participant"), model.id, 1).status_code == 403

    def test_anonymous_is_401(self, client, model):
        assert commit(client, {}, model.id, 1).status_code == 401

    def test_the_author_is_recorded(self, client, model, make_user, token_headers):
        user = make_user("admin")
        assert commit(client, token_headers(user), model.id, 1).json()["author_id"] == user.id


class TestUndo:
    def test_appends_the_parents_weights(self, client, model, researcher):
        edited = commit(client, researcher, model.id, 1).json()
        response = client.post(f"{BASE}/{model.id}/undo", json={"base_version": 2}, headers=researcher)
        assert response.status_code == 201
        body = response.json()
        assert body["number"] == 3 and body["edit"] == {"op": "undo", "undone": 2, "restored": 1}
        first = client.get(f"{BASE}/{model.id}/versions/1", headers=researcher).json()
        assert body["weights_hash"] == first["weights_hash"] != edited["weights_hash"]

    def test_stale_is_409_and_nothing_to_undo_is_422(self, client, model, researcher):
        assert client.post(f"{BASE}/{model.id}/undo", json={"base_version": 1}, headers=researcher).status_code == 422
        commit(client, researcher, model.id, 1)
        assert client.post(f"{BASE}/{model.id}/undo", json={"base_version": 1}, headers=researcher).status_code == 409

    def test_participant_is_forbidden(self, client, model, as_role):
        response = client.post(f"{BASE}/{model.id}/undo", json={"base_version": 1}, headers=as_role("participant"))
        assert response.status_code == 403


class TestRevert:
    def test_appends_that_versions_weights(self, client, model, researcher):
        commit(client, researcher, model.id, 1)
        commit(client, researcher, model.id, 2, concept="grass")
        response = client.post(f"{BASE}/{model.id}/revert", json={"base_version": 3, "to_version": 1},
                               headers=researcher)
        assert response.status_code == 201
        versions = client.get(f"{BASE}/{model.id}/versions", headers=researcher).json()
        assert [v["number"] for v in versions] == [1, 2, 3, 4]
        assert versions[3]["weights_hash"] == versions[0]["weights_hash"]

    def test_unknown_target_is_404(self, client, model, researcher):
        response = client.post(f"{BASE}/{model.id}/revert", json={"base_version": 1, "to_version": 9},
                               headers=researcher)
        assert response.status_code == 404

    def test_participant_is_forbidden(self, client, model, as_role):
        response = client.post(f"{BASE}/{model.id}/revert", json={"base_version": 1, "to_version": 1},
                               headers=as_role("participant"))
        assert response.status_code == 403


class TestDiff:
    def test_names_the_changed_weights(self, client, model, researcher):
        commit(client, researcher, model.id, 1)
        body = client.get(f"{BASE}/{model.id}/diff", params={"from_version": 1, "to_version": 2},
                          headers=researcher).json()
        assert {(c["class_name"], c["concept_name"], c["after"]) for c in body["weight_changes"]} == {
            ("cat", "water", 0.0), ("dog", "water", 0.0), ("bird", "water", 0.0)}

    def test_missing_parameters_or_versions(self, client, model, researcher):
        assert client.get(f"{BASE}/{model.id}/diff", headers=researcher).status_code == 422
        assert client.get(f"{BASE}/{model.id}/diff", params={"from_version": 1, "to_version": 5},
                          headers=researcher).status_code == 404

    def test_participant_is_forbidden(self, client, model, as_role):
        response = client.get(f"{BASE}/{model.id}/diff", params={"from_version": 1, "to_version": 1},
                              headers=as_role("participant"))
        assert response.status_code == 403


def test_two_clients_committing_on_one_version_race_to_exactly_one_201(any_settings):
    """Forced with a barrier inside the editor: both requests have read version 1 before either writes."""
    import threading

    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.services import users as user_service
    from app.services.head_editing import TensorHeadEditor

    barrier = threading.Barrier(2, timeout=20)
    plain_editor = TensorHeadEditor()

    def racing_editor(info, state, edits):
        barrier.wait()
        return plain_editor(info, state, edits)

    app = create_app(any_settings, head_editor=racing_editor)
    ctx = app.state.ctx
    with ctx.session_factory() as session:
        model = register_model(session, ctx.artifacts, author=None)
        user = user_service.create_user(session, "racer", "researcher")
        headers = {"Authorization": f"Bearer {user_service.create_token(session, user, 't')[1]}"}
    statuses = []
    with TestClient(app) as client:
        threads = [threading.Thread(target=lambda c=c: statuses.append(commit(client, headers, model.id, 1, c)))
                   for c in ("water", "grass")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        versions = client.get(f"{BASE}/{model.id}/versions", headers=headers).json()
    assert sorted(r.status_code for r in statuses) == [201, 409]
    loser = next(r for r in statuses if r.status_code == 409)
    assert loser.json()["error"]["detail"]["current_version"]["number"] == 2
    assert [v["number"] for v in versions] == [1, 2]
