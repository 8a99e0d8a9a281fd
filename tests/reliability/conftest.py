"""Fixtures: the app fixtures of ``tests/app`` (in-process app on a migrated SQLite copy) and
a real uvicorn server on loopback serving a copy of the tiny workspace."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.app.conftest import (  # noqa: F401  (fixtures, re-exported for this folder)
    _clean_environment,
    app,
    as_role,
    client,
    ctx,
    db,
    make_user,
    settings,
    sqlite_template,
    token_headers,
    workspace,
)
from tests.app.workspace_helpers import tiny_backbone, tiny_workspace  # noqa: F401

from .harness import SLOW_FACTORY, Prepared, Server, prepare_workspace

EDIT_DELAY_S = 1.5  # the slow server's head editor sleeps this long per edit
LOAD_DELAY_S = 3.0  # and its model loader this long before loading
OVERLOAD_WAIT_S = 0.2  # with one preview slot, waited for this long before 503

FUZZ_USERS = {"fuzz-admin": "admin", "fuzz-researcher": "researcher", "fuzz-participant": "participant"}


@pytest.fixture(scope="session")
def served(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Prepared:  # noqa: F811
    """A private copy of the tiny workspace, migrated, with one user of each role."""
    return prepare_workspace(tiny_workspace, tmp_path_factory.mktemp("served") / "ws", FUZZ_USERS, jobs=3)


@pytest.fixture(scope="session")
def live_server(served: Prepared) -> Iterator[Server]:
    """The real app (``app.main:create_app``) under uvicorn, ready (``/readyz`` is 200), shared by
    the fuzzing and wire-level tests. Its body limit is 2 MB, so over-limit bodies stay small."""
    server = Server(served.workspace, env={"PCBM_MAX_UPLOAD_BYTES": "2000000"})
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


@dataclass
class SlowServer:
    server: Server
    prepared: Prepared
    startup: list[tuple[int, int, Any]]  # (healthz status, readyz status, readyz response) until ready


@pytest.fixture(scope="session")
def slow_server(tiny_workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlowServer]:  # noqa: F811
    """``tests.reliability.slow_app``: the real app with delays injected (see that module), one
    preview slot; what /healthz and /readyz answered while it started is recorded."""
    import time

    import httpx

    prepared = prepare_workspace(tiny_workspace, tmp_path_factory.mktemp("slow") / "ws",
                                 {"admin": "admin", "researcher": "researcher"})
    server = Server(prepared.workspace, factory=SLOW_FACTORY, env={
        "PCBM_TEST_EDIT_DELAY_S": str(EDIT_DELAY_S), "PCBM_TEST_LOAD_DELAY_S": str(LOAD_DELAY_S),
        "PCBM_PREVIEW_CONCURRENCY": "1", "PCBM_OVERLOAD_WAIT_S": str(OVERLOAD_WAIT_S)})
    server.start()
    samples = []
    try:
        deadline = time.monotonic() + 240
        with httpx.Client(base_url=server.url, timeout=5) as client:
            while time.monotonic() < deadline and (not samples or samples[-1][1] != 200):
                try:
                    health, ready = client.get("/healthz"), client.get("/readyz")
                    samples.append((health.status_code, ready.status_code, ready))
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        yield SlowServer(server, prepared, samples)
    finally:
        server.close()
