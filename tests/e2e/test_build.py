"""Building a model in a real Chromium against a real server on 127.0.0.1 that runs its jobs.

On the Build page, train a model from the workspace's embedded dataset and concept bank;
the job page's progress bar polls itself until the job is done, and its result link opens
the new model, which the home page lists with its version.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import chromium, login_link, model_world, new_page, require_browser, serving

pytestmark = pytest.mark.browser
sync_api = require_browser()

STEP_MS = 30_000


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_world(tmp_path_factory, "build-e2e")


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[str]:
    with serving(workspace) as running:  # PCBM_RUN_JOBS defaults to true: this server runs the job
        yield running.url


def test_train_a_model_from_the_build_page_and_open_it(workspace: Path, server: str):
    expect = sync_api.expect
    errors: list[str] = []
    with chromium(sync_api) as browser:
        page = new_page(browser, server, errors, STEP_MS)
        page.goto(login_link(workspace, "builder"))
        page.get_by_role("link", name="Build", exact=True).click()
        expect(page.locator("#datasets tr[data-name='toy']")).to_be_visible()
        form = page.locator("#build-model form")
        form.locator("input[name='name']").fill("built-in-browser")
        form.locator("select[name='embeddings']").select_option("toy")
        form.locator("select[name='bank']").select_option("concepts")
        form.locator("input[name='lam']").fill("0.02")
        form.get_by_role("button", name="Train").click()

        expect(page.locator("h1")).to_have_text("Training model built-in-browser")
        expect(page.locator("#job-progress .badge")).to_have_text("done")  # swapped in by the poller
        page.get_by_role("link", name="See the result").click()
        expect(page.locator("h1")).to_contain_text("built-in-browser")
        page.goto("/")
        expect(page.get_by_role("link", name="built-in-browser", exact=True)).to_be_visible()
    assert errors == [], f"JavaScript errors: {errors}"
