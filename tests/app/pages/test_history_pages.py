"""The history page: versions, accuracy across versions, revert, and comparing two versions."""

import json

from sqlalchemy import select

from app.models import Model
from app.services import history

from .helpers import text_of

PRUNE_WATER = json.dumps([{"op": "prune", "concept": "water", "class_name": "bird"}])


def model_id(db, name):
    return db.scalar(select(Model.id).where(Model.name == name))


def commit(client, csrf, model, edits=PRUNE_WATER, base_version=1, message="drop water for birds"):
    response = client.post(f"/models/{model}/commit", data={
        "csrf_token": csrf, "edits": edits, "base_version": base_version, "message": message,
    }, follow_redirects=False)
    assert response.status_code == 303, text_of(response.text)


def revert(client, csrf, model, version, base_version):
    return client.post(f"/models/{model}/revert", data={
        "csrf_token": csrf, "version": version, "base_version": base_version}, follow_redirects=False)


class TestHistoryPage:
    def test_lists_versions_with_author_edit_accuracy_and_a_chart(self, client, db, served, browser):
        commit(client, browser, served)
        response = client.get(f"/models/{served}/history")
        assert response.status_code == 200
        text = text_of(response.text)
        assert "v2 current" in text and "v1" in text
        assert "rita" in text and "drop water for birds" in text and "prune “water” for bird" in text
        assert "trained" in text  # version 1's op
        v2 = history.get_version(db, model_id(db, served), 2)
        shifted = v2.metrics["test_shifted"]["accuracy"]
        assert f"{shifted * 100:.1f}%" in text
        assert "Accuracy across versions" in response.text  # app.plots.metric_lines
        assert 'action="/models/tiny-pcbm/revert"' in response.text

    def test_revert_to_version_1_appends_a_version(self, client, db, served, browser):
        commit(client, browser, served)
        response = revert(client, browser, served, version=1, base_version=2)
        assert response.status_code == 303 and response.headers["location"] == f"/models/{served}/history"
        versions = history.list_versions(db, model_id(db, served))
        assert [v.number for v in versions] == [1, 2, 3]
        assert versions[2].weights_hash == versions[0].weights_hash and versions[2].edit == {"op": "revert", "to": 1}
        page = text_of(client.get(response.headers["location"]).text)
        assert "Reverted to v1" in page and "revert to v1" in page

    def test_a_stale_revert_is_explained(self, client, db, served, browser):
        commit(client, browser, served)
        response = revert(client, browser, served, version=1, base_version=1)
        assert response.status_code == 409
        assert "Someone else changed this model" in text_of(response.text)
        assert len(history.list_versions(db, model_id(db, served))) == 2

    def test_reverting_to_the_current_version_is_refused(self, client, served, browser):
        response = revert(client, browser, served, version=1, base_version=1)
        assert response.status_code == 422 and "already the head" in text_of(response.text)


class TestCompare:
    def test_two_versions_side_by_side(self, client, served, browser):
        commit(client, browser, served)
        response = client.get(f"/models/{served}/history", params={"a": 1, "b": 2})
        text = text_of(response.text)
        assert "v1 → v2" in text and "1 changed weight" in text
        assert "bird water +2.500 0.000 −2.500" in text
        assert 'value="1" form="compare-form"' in response.text and "checked" in response.text

    def test_the_fragment_alone(self, client, served, browser):
        commit(client, browser, served)
        response = client.get(f"/models/{served}/diff", params={"a": 2, "b": 1})
        assert response.status_code == 200 and "<html" not in response.text
        assert 'id="diff"' in response.text and "v2 → v1" in text_of(response.text)

    def test_missing_choice_asks_for_two_versions(self, client, served, browser):
        response = client.get(f"/models/{served}/diff", params={"a": "1", "b": ""})
        assert response.status_code == 200 and "Pick a version" in text_of(response.text)

    def test_unknown_version_is_a_404_page(self, client, served, browser):
        response = client.get(f"/models/{served}/history", params={"a": 1, "b": 9})
        assert response.status_code == 404 and "no version 9" in text_of(response.text)
