"""The image page's concept-map overlay in a real Chromium against a real server on 127.0.0.1.

Pick another concept in the selector: htmx swaps the overlay, whose PNG bytes must change.
Click a bar of the contribution waterfall: the page shows that concept's map.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]
SECRET = "overlay-e2e-secret-" + "o" * 40
STEP_MS = 20_000

if not CHROMIUM.exists():
    pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.db import make_engine
    from app.migrate import upgrade
    from tests.app.workspace_helpers import build_workspace, make_backbone

    base = tmp_path_factory.mktemp("overlay-e2e")
    root = build_workspace(base / "ws", make_backbone(base / "backbone"))
    engine = make_engine(f"sqlite:///{root / 'pcbm.db'}")
    upgrade(engine)
    engine.dispose()
    return root


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[str]:
    port = _port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBM_")}
    env.update(PCBM_WORKSPACE=str(workspace), PCBM_SECRET_KEY=SECRET, PCBM_DEVICE="cpu", PYTHONPATH=str(ROOT))
    log = workspace / "server.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", "warning"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _login_link(workspace: Path) -> str:
    from app.context import open_database
    from app.models import Role
    from app.services import users
    from app.settings import Settings

    engine, factory = open_database(Settings(workspace=workspace, secret_key=SECRET))
    try:
        with factory() as session:
            return users.create_login_link(session, users.create_user(session, "overlay-researcher", Role.RESEARCHER))
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def page(server: str):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=server)
        context.set_default_timeout(STEP_MS)
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        yield tab
        browser.close()
        assert errors == [], f"JavaScript errors: {errors}"


def _target_of(src: str) -> str:
    return parse_qs(urlparse(src).query)["target"][0]


def test_choosing_another_concept_changes_the_overlay_image(workspace: Path, page):
    from ml.embed import EmbeddedDataset

    expect = sync_api.expect
    image_id = EmbeddedDataset.load(workspace / "embeddings" / "toy.safetensors").split("test").image_ids[0]
    page.goto(_login_link(workspace))
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
