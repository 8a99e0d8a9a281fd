"""The model page, its concept table, and editing from it: preview, commit, undo, conflicts."""

import json
import re

import pytest
from sqlalchemy import select

from app.models import Model, Role
from app.services import history, inspect
from app.templating import pct

from .helpers import hidden_value, sign_in, text_of
from .world import CLASSES, CONCEPTS

HX = {"HX-Request": "true"}


def table_rows(html: str, table_id: str) -> dict[str, list[str]]:
    """{row header: [cell texts]} of the table inside the element with id ``table_id``."""
    start = html.index(f'id="{table_id}"')
    body = html[start:html.index("</table>", start)]
    rows = {}
    for row in re.findall(r"<tr\b.*?</tr>", body, flags=re.S):
        header = re.search(r'<th scope="row">(.*?)</th>', row, flags=re.S)
        if header:
            cells = [text_of(c) for c in re.findall(r"<td\b.*?</td>", row, flags=re.S)]
            rows[text_of(header.group(1)).replace(" target", "")] = cells
    return rows


def model_id(db, name):
    return db.scalar(select(Model.id).where(Model.name == name))


class TestModelPage:
    def test_shows_what_the_model_is_and_every_concept(self, client, served, browser):
        response = client.get(f"/models/{served}")
        assert response.status_code == 200
        text = text_of(response.text)
        for concept in CONCEPTS:
            assert concept in text
        assert "demo" in text and "tiny-concepts" in text and "v1" in text
        assert response.text.count('class="chart weights"') + response.text.count("<svg") >= 2

    def test_class_selector_and_table_show_the_service_weights(self, client, ctx, db, served, browser):
        response = client.get(f"/models/{served}", params={"class": "bird", "sort": "name", "order": "asc"})
        rows = table_rows(response.text, "concept-table")
        expected = inspect.concept_weights(ctx.models, model_id(db, served), class_name="bird", sort="name",
                                           order="asc")
        assert list(rows) == [c["concept"] for c in expected["concepts"]] == sorted(CONCEPTS)
        water = rows["water"]
        assert water[0] == "+2.500" and water[1] == "2.500"
        assert "weights for bird" in text_of(response.text)

    def test_search_filters_the_table_and_the_fragment_has_no_layout(self, client, served, browser):
        response = client.get(f"/models/{served}/concepts", params={"class": "cat", "q": "WAT"})
        assert response.status_code == 200 and "<html" not in response.text
        assert list(table_rows(response.text, "concept-table")) == ["water"]
        page = client.get(f"/models/{served}", params={"class": "cat", "q": "zzz"})
        assert "No concept matches" in text_of(page.text)

    def test_unknown_class_falls_back_to_the_first(self, client, served, browser):
        response = client.get(f"/models/{served}", params={"class": "<unicorn>", "sort": "nonsense"})
        assert response.status_code == 200 and "weights for cat" in text_of(response.text)
        assert "<unicorn>" not in response.text

    def test_unknown_model_is_an_html_404(self, client, browser):
        response = client.get("/models/nope")
        assert response.status_code == 404
        assert response.headers["content-type"].startswith("text/html")
        assert "no model called" in text_of(response.text)

    def test_participants_are_refused_with_a_page(self, client, db, served, make_user):
        sign_in(client, db, make_user(Role.PARTICIPANT))
        response = client.get(f"/models/{served}")
        assert response.status_code == 403 and "researchers and admins" in text_of(response.text)


def preview(client, csrf, model, edits="[]", htmx=True, **fields):
    data = {"csrf_token": csrf, "base_version": fields.pop("base_version", 1), "edits": edits, **fields}
    return client.post(f"/models/{model}/preview", data=data, headers=HX if htmx else {}, follow_redirects=False)


class TestPreview:
    def test_shows_the_services_numbers_for_every_split(self, client, ctx, db, served, browser):
        response = preview(client, browser, served, prune_class="water", **{"class": "bird"})
        assert response.status_code == 200 and "<html" not in response.text
        expected = inspect.preview(ctx.models, model_id(db, served), [
            {"op": "prune", "concept": "water", "class_name": "bird", "source": "user"}], base_version=1)
        rows = table_rows(response.text, "preview-splits")
        assert set(rows) == {s["name"] for s in expected["splits"]} == {"train", "test", "test_shifted"}
        for split in expected["splits"]:
            count, before, after, _change = rows[split["name"]]
            assert (before, after) == (pct(split["accuracy"]["before"]), pct(split["accuracy"]["after"]))
            assert int(count) == split["n"]
        assert 'class="highlight"' in response.text and "target" in text_of(response.text)  # the shifted split
        shifted = next(s for s in expected["splits"] if s["name"] == "test_shifted")
        assert shifted["accuracy"]["after"] > shifted["accuracy"]["before"]
        groups = table_rows(response.text, "preview-groups")
        assert "test_shifted · water" in groups
        assert table_rows(response.text, "preview-classes").keys() == set(CLASSES)
        assert f"{sum(s['n_flipped'] for s in expected['splits'])} predictions change" in text_of(response.text)
        assert "/images/view?id=" in response.text  # flipped images link to their page

    def test_edits_accumulate_and_travel_to_the_commit_form(self, client, served, browser):
        first = preview(client, browser, served, prune_class="water", **{"class": "bird"})
        pending = hidden_value(first.text, "edits")
        second = preview(client, browser, served, edits=pending, prune_all="grass")
        edits = json.loads(hidden_value(second.text, "edits"))
        assert [(e["concept"], e.get("class_name")) for e in edits] == [("water", "bird"), ("grass", None)]
        assert "Prune “grass” for every class" in text_of(second.text)
        again = preview(client, browser, served, edits=hidden_value(second.text, "edits"), prune_all="grass")
        assert len(json.loads(hidden_value(again.text, "edits"))) == 2  # the same prune is not added twice

    def test_works_without_javascript(self, client, served, browser):
        response = preview(client, browser, served, htmx=False, prune_all="water")
        assert response.status_code == 200 and "<html" in response.text
        assert 'id="preview-splits"' in response.text and "Commit as a new version" in response.text

    def test_an_unknown_concept_is_explained_in_the_panel(self, client, served, browser):
        bad = json.dumps([{"op": "prune", "concept": "<b>unicorn</b>"}])
        response = preview(client, browser, served, edits=bad)
        assert response.status_code == 200 and "unknown concept" in text_of(response.text)
        assert "<b>unicorn</b>" not in response.text
        assert preview(client, browser, served, edits=bad, htmx=False).status_code == 422

    def test_a_stale_version_is_explained(self, client, served, browser):
        response = preview(client, browser, served, base_version=7, prune_all="water", htmx=False)
        assert response.status_code == 409 and "Someone else changed this model" in text_of(response.text)

    def test_broken_pending_edits_are_refused(self, client, served, browser):
        response = preview(client, browser, served, edits="{not json", htmx=False)
        assert response.status_code == 422 and "not valid JSON" in text_of(response.text)


def commit(client, csrf, model, edits, base_version=1, message="remove the spurious water"):
    return client.post(f"/models/{model}/commit", data={
        "csrf_token": csrf, "edits": edits, "base_version": base_version, "message": message,
    }, follow_redirects=False)


PRUNE_WATER = json.dumps([{"op": "prune", "concept": "water", "class_name": "bird"}])


class TestCommitAndUndo:
    def test_commit_creates_version_2_and_history_lists_it(self, client, ctx, db, served, browser):
        response = commit(client, browser, served, PRUNE_WATER)
        assert response.status_code == 303 and response.headers["location"] == f"/models/{served}"
        page = client.get(response.headers["location"])
        assert "Saved as version 2" in text_of(page.text) and "v2" in text_of(page.text)
        ident = model_id(db, served)
        version = history.get_version(db, ident, 2)
        assert version.message == "remove the spurious water" and version.author.name == "rita"
        weights = history.load_state(db, ctx.artifacts, ident, 2).tensors["weight"]
        assert float(weights[CLASSES.index("bird"), CONCEPTS.index("water")]) == 0.0
        assert version.metrics["test_shifted"]["accuracy"] > history.get_version(db, ident, 1).metrics[
            "test_shifted"]["accuracy"]
        listed = text_of(client.get(f"/models/{served}/history").text)
        assert "remove the spurious water" in listed and "prune “water” for bird" in listed
        assert "v2 current" in listed

    def test_a_stale_commit_says_so_and_keeps_the_edits(self, client, db, served, browser):
        assert commit(client, browser, served, PRUNE_WATER).status_code == 303
        stale = commit(client, browser, served, json.dumps([{"op": "prune", "concept": "grass"}]),
                       message="another idea")
        assert stale.status_code == 409
        text = text_of(stale.text)
        assert "Someone else changed this model" in text and "version 2" in text and "not saved" in text
        assert json.loads(hidden_value(stale.text, "edits"))[0]["concept"] == "grass"
        assert len(history.list_versions(db, model_id(db, served))) == 2

    def test_undo_restores_version_1s_weights_as_version_3(self, client, db, served, browser):
        commit(client, browser, served, PRUNE_WATER)
        page = client.get(f"/models/{served}")
        assert hidden_value(page.text[page.text.index('action="/models/tiny-pcbm/undo"'):], "base_version") == "2"
        response = client.post(f"/models/{served}/undo", data={"csrf_token": browser, "base_version": 2},
                               follow_redirects=False)
        assert response.status_code == 303
        ident = model_id(db, served)
        versions = history.list_versions(db, ident)
        assert [v.number for v in versions] == [1, 2, 3]
        assert versions[2].weights_hash == versions[0].weights_hash and versions[2].edit["op"] == "undo"
        assert "Undid version 2" in text_of(client.get(f"/models/{served}").text)

    def test_nothing_to_undo_on_version_1(self, client, served, browser):
        response = client.post(f"/models/{served}/undo", data={"csrf_token": browser, "base_version": 1})
        assert response.status_code == 422 and "nothing to undo" in text_of(response.text)

    def test_empty_commit_is_refused(self, client, served, browser):
        response = commit(client, browser, served, "[]")
        assert response.status_code == 422 and "nothing to commit" in text_of(response.text)


@pytest.mark.parametrize("path, data", [
    ("preview", {"base_version": "1", "prune_all": "water"}),
    ("commit", {"base_version": "1", "edits": PRUNE_WATER, "message": "x"}),
    ("undo", {"base_version": "1"}),
    ("revert", {"base_version": "1", "version": "1"}),
])
def test_every_edit_form_needs_the_csrf_token(client, db, served, browser, path, data):
    for token in (None, "forged"):
        sent = {**data, **({"csrf_token": token} if token else {})}
        response = client.post(f"/models/{served}/{path}", data=sent, follow_redirects=False)
        assert response.status_code == 403 and "CSRF" in text_of(response.text)
    assert len(history.list_versions(db, model_id(db, served))) == 1
