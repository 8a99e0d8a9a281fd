"""What every browser test shares: Chromium's launch, a real uvicorn server on 127.0.0.1, logins.

Browser tests need Debian's Chromium (``apt-get install chromium``; never ``playwright
install``). Modules call :func:`require_browser` first, so a machine without it skips them
with that reason.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]
SECRET = "e2e-secret-key-" + "s" * 40
READY_S = 90


def require_browser():
    """playwright's sync API, or skip the calling module with the reason."""
    if not CHROMIUM.exists():
        pytest.skip(f"browser tests need Debian's Chromium at {CHROMIUM} (apt-get install chromium)",
                    allow_module_level=True)
    return pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def migrated(root: Path) -> Path:
    """``root``'s workspace with its SQLite database migrated to the newest revision."""
    from app.db import make_engine
    from app.migrate import upgrade

    engine = make_engine(f"sqlite:///{root / 'pcbm.db'}")
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return root


def pages_world(tmp_path_factory, label: str) -> Path:
    """The pages tests' tiny world (fake embeddings, 3 classes), migrated, in a fresh folder."""
    from tests.app.pages.world import build_world

    return migrated(build_world(tmp_path_factory.mktemp(label)))


def model_world(tmp_path_factory, label: str) -> Path:
    """A tiny workspace with a real (tiny, random) open_clip backbone, migrated, in a fresh folder."""
    from tests.app.workspace_helpers import build_workspace, make_backbone

    base = tmp_path_factory.mktemp(label)
    return migrated(build_workspace(base / "ws", make_backbone(base / "backbone")))


class Server:
    """``uvicorn --factory app.main:create_app`` in a subprocess serving ``workspace``."""

    def __init__(self, workspace: Path, port: int | None = None, log: Path | None = None):
        self.workspace, self.port = workspace, port or free_port()
        self.log = log or workspace / "server.log"
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
        deadline = time.monotonic() + READY_S
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


@contextmanager
def serving(workspace: Path) -> Iterator[Server]:
    running = Server(workspace)
    running.start()
    try:
        yield running
    finally:
        running.stop()


@contextmanager
def open_database(workspace: Path):
    """(engine, session factory) of the server's database, disposed on exit."""
    from app.context import open_database as open_db
    from app.settings import Settings

    engine, factory = open_db(Settings(workspace=workspace, secret_key=SECRET))
    try:
        yield factory
    finally:
        engine.dispose()


def login_link(workspace: Path, name: str) -> str:
    """A fresh researcher ``name`` and a one-time login link for them, as `pcbm demo` prints."""
    from app.models import Role
    from app.services import users

    with open_database(workspace) as factory, factory() as session:
        return users.create_login_link(session, users.create_user(session, name, Role.RESEARCHER))


@contextmanager
def chromium(sync_api) -> Iterator:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser, base_url: str, errors: list[str], step_ms: int):
    """A page in a fresh context (own cookies) that records JavaScript errors in ``errors``."""
    context = browser.new_context(base_url=base_url)
    context.set_default_timeout(step_ms)
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page
