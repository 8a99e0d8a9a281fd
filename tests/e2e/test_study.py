"""A whole user study in a real Chromium against a real server on 127.0.0.1.

A researcher sets up a study with two conditions, opens it and makes three invitation
links; three participants join by link, each in a browser context of their own, inspect
concepts and prune different ones (through the preview when their condition has it), and
submit. The dashboard then shows three submissions with the held-out accuracies the
library computes for those prunes, and the export holds every action the server logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    Server,
    chromium,
    login_link,
    new_page,
    open_database,
    pages_world,
    require_browser,
    serving,
)

pytestmark = pytest.mark.browser
sync_api = require_browser()

STEP_MS = 15_000
TARGET = "test_shifted"
PLANS = [("bird", "water"), ("bird", "grass"), ("cat", "striped")]  # one different prune each


def stored_events(workspace: Path, study_id: int) -> list[tuple[str, str]]:
    from sqlalchemy import select

    from app.models_studies import StudyEvent

    with open_database(workspace) as factory, factory() as session:
        rows = session.execute(select(StudyEvent.pseudonym, StudyEvent.kind).where(StudyEvent.study_id == study_id))
        return sorted((pseudonym, kind) for pseudonym, kind in rows)


def expected_accuracy(workspace: Path, class_name: str, concept: str) -> float:
    """Held-out accuracy of the world's model with one prune, by the library alone."""
    from ml.editing import apply_edits
    from ml.embed import EmbeddedDataset
    from ml.pcbm import load_model

    model, _ = apply_edits(load_model(workspace / "models" / "tiny-pcbm"),
                           [{"op": "prune", "concept": concept, "class_name": class_name}])
    data = EmbeddedDataset.load(workspace / "embeddings" / "tiny.safetensors").split(TARGET)
    return int((model.decision_function(data.embeddings).argmax(1) == data.labels).sum()) / len(data.labels)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pages_world(tmp_path_factory, "e2e-study")


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[Server]:
    with serving(workspace) as running:
        yield running


@pytest.fixture(scope="module")
def browser(server: Server):
    with chromium(sync_api) as running:
        yield running


def take_part(page, link: str, class_name: str, concept: str) -> str:
    """Join by ``link``, inspect a concept, prune it for ``class_name`` and submit; returns the pseudonym."""
    expect = sync_api.expect
    page.goto(link)
    page.get_by_label("I have read this and agree to take part.").check()
    page.get_by_role("button", name="Start the study").click()
    expect(page.locator("#study-task")).to_have_text("Make the model work when the background changes.")
    pseudonym = page.locator(".flashes").inner_text().rsplit(" ", 1)[-1].rstrip(".")
    expect(page.locator("nav.mainnav a")).to_have_count(1)  # only "Your study"
    page.select_option("#f-class", class_name)
    table = page.locator("#study-concepts")
    expect(table.locator("caption")).to_contain_text(f"for {class_name}")
    row = table.locator(f'tr[data-concept="{concept}"]')
    row.locator("a.inspect").click()
    expect(page.locator("#study-concept h3")).to_contain_text(concept)
    with_preview = page.locator("#study-preview").count() == 1
    row.locator('button[name="prune"]').click()
    if with_preview:  # the preview shows the in-distribution split only, then the prune is applied
        expect(page.locator("#study-preview-splits tbody tr")).to_have_count(1)
        expect(page.locator("#study-preview-splits")).not_to_contain_text(TARGET)
        page.get_by_role("button", name="Apply these prunes").click()
    expect(page.locator(".flashes")).to_contain_text("your model is at version 2")
    expect(page.locator("#study-prunes")).to_contain_text(f"“{concept}” for {class_name}")
    page.get_by_label("I am finished: submit version 2").check()
    page.get_by_role("button", name="Submit my model").click()
    expect(page.locator("#study-done")).to_contain_text("You submitted version 2")
    assert TARGET not in page.content()
    return pseudonym


def test_a_whole_study_with_three_participants(server: Server, workspace: Path, browser):
    expect = sync_api.expect
    errors: list[str] = []
    researcher = new_page(browser, server.url, errors, STEP_MS)

    # The researcher sets up a study with two conditions and opens it.
    researcher.goto(login_link(workspace, "e2e-study-researcher"))
    researcher.goto("/studies/new")
    researcher.get_by_label("Name", exact=True).fill("Unusual backgrounds")
    researcher.get_by_label("Task, as participants will read it").fill(
        "Make the model work when the background changes.")
    researcher.locator('textarea[name="conditions"]').fill("with preview: weights, preview\nweights only: weights")
    researcher.locator('input[name="edit_budget"]').fill("2")
    researcher.get_by_label("Consent text, shown before joining").fill("Your actions are logged under a pseudonym.")
    researcher.get_by_role("button", name="Create the study").click()
    expect(researcher.locator("#study-status")).to_have_text("draft")
    study_id = int(researcher.url.rstrip("/").rsplit("/", 1)[-1])
    expect(researcher.locator("ul.conditions li")).to_have_count(2)
    researcher.get_by_role("button", name="Open the study").click()
    expect(researcher.locator("#study-status")).to_have_text("open")
    researcher.locator('input[name="count"]').fill("3")
    researcher.get_by_role("button", name="Make invitation links").click()
    links = researcher.locator("#invitation-links code").all_inner_texts()
    assert len(links) == 3

    # Three participants, each in a browser context of their own, prune different concepts.
    pseudonyms = {}
    for link, (class_name, concept) in zip(links, PLANS, strict=True):
        participant = new_page(browser, server.url, errors, STEP_MS)
        pseudonyms[take_part(participant, link, class_name, concept)] = (class_name, concept)
        participant.context.close()

    # The dashboard shows the three submissions with the accuracies the library computes.
    researcher.goto(f"/studies/{study_id}")
    rows = researcher.locator("#submissions tbody tr")
    expect(rows).to_have_count(3)
    for pseudonym, (class_name, concept) in pseudonyms.items():
        row = researcher.locator(f'#submissions tr[data-pseudonym="{pseudonym}"]')
        assert float(row.get_attribute("data-accuracy")) == expected_accuracy(workspace, class_name, concept)
        expect(row).to_contain_text(f"{concept} for {class_name}")
    expect(researcher.locator("#baselines tr[data-name='oracle']")).to_be_visible()
    expect(researcher.locator("svg.chart-strip g.row")).to_have_count(2)  # one row per condition

    # Closing freezes it; the export holds every logged action.
    researcher.get_by_role("button", name="Close and freeze").click()
    expect(researcher.locator("#study-status")).to_have_text("closed")
    response = researcher.context.request.get(f"/api/v1/studies/{study_id}/export?format=json")
    assert response.status == 200
    bundle = json.loads(response.body())
    exported = sorted((e["pseudonym"], e["kind"]) for e in bundle["tables"]["events"])
    assert exported == stored_events(workspace, study_id)
    for pseudonym in pseudonyms:
        kinds = {kind for who, kind in exported if who == pseudonym}
        assert {"join", "page_view", "class_view", "concept_inspect", "edit_commit", "submit"} <= kinds
    previews = {who for who, kind in exported if kind == "preview"}
    with_preview = {r["pseudonym"] for r in bundle["tables"]["participants"] if r["condition"] == "with preview"}
    assert previews == with_preview
    assert {r["pseudonym"]: r["target_accuracy"] for r in bundle["tables"]["submissions"]} == {
        p: expected_accuracy(workspace, *plan) for p, plan in pseudonyms.items()}
    assert errors == [], f"JavaScript errors: {errors}"
