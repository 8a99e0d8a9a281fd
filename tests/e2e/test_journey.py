"""One researcher's journey in a real Chromium against a real server on 127.0.0.1.

Sign in with a one-time link, open a model, prune a concept and read the preview, commit,
undo, revert from the history, compare two versions; then restart the server on the same
database and workspace and find the history intact and the current version served.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.pages.world import build_world

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny-pcbm"
SECRET = "e2e-secret-key-" + "s" * 40
STEP_MS = 15_000  # the longest any single step may take

if not CHROMIUM.exists():
    pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``uvicorn --factory app.main:create_app`` in a subprocess serving ``workspace``."""

    def __init__(self, workspace: Path, port: int, log: Path):
        self.workspace, self.port, self.log = workspace, port, log
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PCBM_")}
        env.update(PCBM_WORKSPACE=str(self.workspace), PCBM_SECRET_KEY=SECRET, PCBM_DEVICE="cpu",
                   PYTHONPATH=str(ROOT))
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "warning"],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None


def login_link(workspace: Path) -> str:
    """A fresh researcher and a one-time link for them (as `pcbm demo` prints), made in this process."""
    from app.context import open_database
    from app.models import Role
    from app.services import users
    from app.settings import Settings

    engine, factory = open_database(Settings(workspace=workspace, secret_key=SECRET))
    try:
        with factory() as session:
            user = users.create_user(session, "e2e-researcher", Role.RESEARCHER)
            return users.create_login_link(session, user)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.db import make_engine
    from app.migrate import upgrade

    root = build_world(tmp_path_factory.mktemp("e2e"))
    engine = make_engine(f"sqlite:///{root / 'pcbm.db'}")
    upgrade(engine)
    engine.dispose()
    return root


@pytest.fixture(scope="module")
def server(workspace: Path) -> Iterator[Server]:
    running = Server(workspace, free_port(), workspace / "server.log")
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def page(server: Server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(base_url=server.url)
        context.set_default_timeout(STEP_MS)
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        yield tab
        browser.close()
        assert errors == [], f"JavaScript errors: {errors}"


def test_edit_preview_commit_undo_revert_compare_and_restart(server: Server, workspace: Path, page):
    expect = sync_api.expect

    # Sign in with a one-time link: it lands on the model list.
    page.goto(login_link(workspace))
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
