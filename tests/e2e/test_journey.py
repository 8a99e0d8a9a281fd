"""One researcher's journey in a real Chromium against a real server on 127.0.0.1.

Sign in with a one-time link, open a model, prune a concept and read the preview, commit,
undo, revert from the history, compare two versions; then restart the server on the same
database and workspace and find the history intact and the current version served.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Server, chromium, login_link, new_page, pages_world, require_browser, serving

pytestmark = pytest.mark.browser
sync_api = require_browser()

MODEL = "tiny-pcbm"
STEP_MS = 15_000  # the longest any single step may take


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pages_world(tmp_path_factory, "e2e")


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[Server]:
    with serving(workspace) as running:
        yield running


@pytest.fixture(scope="module")
def page(server: Server):
    errors: list[str] = []
    with chromium(sync_api) as browser:
        yield new_page(browser, server.url, errors, STEP_MS)
    assert errors == [], f"JavaScript errors: {errors}"


def test_edit_preview_commit_undo_revert_compare_and_restart(server: Server, workspace: Path, page):
    expect = sync_api.expect

    # Sign in with a one-time link: it lands on the model list.
    page.goto(login_link(workspace, "e2e-researcher"))
    expect(page.locator("h1")).to_have_text("Models")
    expect(page.locator(".username")).to_have_text("e2e-researcher")
    page.get_by_role("link", name=MODEL, exact=True).click()
    expect(page.locator("h1")).to_contain_text(MODEL)

    # Pick the class (htmx swaps the class view), prune "water" for it: the preview appears at once.
    page.select_option("#f-class", "bird")
    expect(page.locator("#concept-table caption")).to_contain_text("weights for bird")
    page.locator('tr[data-concept="water"] button[name="prune_class"]').click()
    splits = page.locator("#preview-splits")
    expect(splits).to_be_visible()
    expect(page.locator("#preview .edit-list")).to_contain_text("Prune “water” for bird")
    shifted = splits.locator("tr.highlight")
    expect(shifted).to_contain_text("test_shifted")
    expect(shifted.locator("td.delta")).to_have_class("num delta pos")
    assert page.url.endswith(f"/models/{MODEL}?class=bird")  # the preview did not leave the page

    # Commit with a message: a new version.
    page.fill('input[name="message"]', "prune the spurious water")
    page.get_by_role("button", name="Commit as a new version").click()
    expect(page.locator(".flashes")).to_contain_text("Saved as version 2")
    expect(page.locator("h1 .badge")).to_have_text("v2")

    # One-click undo: version 3 has version 1's weights.
    page.get_by_role("button", name="Undo last edit").click()
    expect(page.locator(".flashes")).to_contain_text("Undid version 2")
    expect(page.locator("h1 .badge")).to_have_text("v3")

    # History: revert to version 1 (version 4), then compare v1 with v2 side by side.
    page.get_by_role("link", name="History").click()
    expect(page.locator("table.history tbody tr")).to_have_count(3)
    page.get_by_role("button", name="Revert to v1").click()
    expect(page.locator(".flashes")).to_contain_text("Reverted to v1")
    expect(page.locator("table.history tbody tr")).to_have_count(4)
    page.get_by_label("Compare v1 as A").check()
    page.get_by_label("Compare v2 as B").check()
    page.get_by_role("button", name="Compare A with B").click()
    diff = page.locator("#diff")
    expect(diff.locator("h2")).to_have_text("v1 → v2")
    expect(diff.locator("table.weights-diff")).to_contain_text("water")

    # A new server process on the same database and workspace: nothing lost, v4 served.
    server.stop()
    server.start()
    page.goto(f"/models/{MODEL}/history")
    rows = page.locator("table.history tbody tr")
    expect(rows).to_have_count(4)
    expect(rows.nth(0)).to_contain_text("revert to v1")
    expect(rows.nth(1)).to_contain_text("undo v2")
    expect(rows.nth(2)).to_contain_text("prune the spurious water")
    page.goto(f"/models/{MODEL}?class=bird&q=water")
    expect(page.locator("h1 .badge")).to_have_text("v4")
    expect(page.locator('tr[data-concept="water"] td.weight')).to_have_text("+2.500")  # v1's weight is back
