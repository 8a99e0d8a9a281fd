"""The image page's concept-map overlay in a real Chromium against a real server on 127.0.0.1.

Pick another concept in the selector: htmx swaps the overlay, whose PNG bytes must change.
Click a bar of the contribution waterfall: the page shows that concept's map.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from tests.e2e.harness import chromium, login_link, model_world, new_page, require_browser, serving

pytestmark = pytest.mark.browser
sync_api = require_browser()

STEP_MS = 20_000


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_world(tmp_path_factory, "overlay-e2e")


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[str]:
    with serving(workspace) as running:
        yield running.url


@pytest.fixture(scope="module")
def page(server: str):
    errors: list[str] = []
    with chromium(sync_api) as browser:
        yield new_page(browser, server, errors, STEP_MS)
    assert errors == [], f"JavaScript errors: {errors}"


def _target_of(src: str) -> str:
    return parse_qs(urlparse(src).query)["target"][0]


def test_choosing_another_concept_changes_the_overlay_image(workspace: Path, page):
    from ml.embed import EmbeddedDataset

    expect = sync_api.expect
    image_id = EmbeddedDataset.load(workspace / "embeddings" / "toy.safetensors").split("test").image_ids[0]
    page.goto(login_link(workspace, "overlay-researcher"))
    page.goto(f"/models/pcbm/images/view?id={image_id}&target=concept:water")
    overlay = page.locator("img#overlay")
    first_src = overlay.get_attribute("src")
    assert _target_of(first_src) == "concept:water"
    first = page.request.get(first_src)
    assert first.ok and first.headers["content-type"] == "image/png"
    assert first.headers["x-concept-maps"] not in ("unavailable", "coming")
    expect(page.locator("#overlay-figure svg.chart-colorbar")).to_have_count(1)

    page.select_option("#overlay-target", "concept:grass")  # htmx swaps #overlay-figure
    expect(page.locator("img#overlay")).to_have_attribute("src", contains("concept%3Agrass"))
    second_src = page.locator("img#overlay").get_attribute("src")
    assert _target_of(second_src) == "concept:grass"
    second = page.request.get(second_src)
    assert second.ok and second.body() != first.body()
    assert page.evaluate("document.getElementById('overlay').naturalWidth") > 0  # the browser decoded it

    # A waterfall bar is a link to its concept's map.
    bar = page.locator("svg.chart-waterfall a").first
    concept = bar.locator("g.step").get_attribute("data-concept")
    bar.locator("rect.bar").click()
    expect(page.locator("img#overlay")).to_have_attribute("src", contains(f"concept%3A{concept}"))


def contains(fragment: str) -> re.Pattern:
    return re.compile(re.escape(fragment))
