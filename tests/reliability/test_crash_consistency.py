"""``kill -9`` the server during edit commits, 20 times; every edit is wholly there or not at all.

The loop and its checks live in bench/crash_loop.py (``make crash-loop`` runs 200
iterations). tests/app/test_history.py already proves the same properties for failures
injected at each step inside one process and for a hypothesis-driven random history;
this is the real-process version: SIGKILL, no cleanup, restart, check.

The checker is tested first on a database damaged on purpose, so that "no violations"
means something.
"""

from __future__ import annotations

import sqlite3

import pytest

from bench.crash_loop import check_database, run_crash_loop
from tests.app.history_helpers import register_model

ITERATIONS = 20


@pytest.fixture
def history(db, ctx, make_user):
    """A model with three versions, committed through the real history service."""
    from app.services import history as history_service

    author = make_user("researcher")
    model = register_model(db, ctx.artifacts, author=author)
    for number, concept in ((1, "water"), (2, "grass")):
        history_service.commit_edit(db, ctx.artifacts, model.id, number, [{"op": "prune", "concept": concept}],
                                    author=author, editor=ctx.head_editor, message=f"prune {concept}")
    return ctx.settings.workspace, model.id


def damage(workspace, sql: str, *args) -> None:
    with sqlite3.connect(workspace / "pcbm.db") as db:
        db.execute("PRAGMA foreign_keys = OFF")
        db.execute(sql, args)


def test_the_checker_passes_a_sound_history(history):
    workspace, _ = history
    assert check_database(workspace) == []


@pytest.mark.parametrize("what, sql, expected", [
    ("audit event lost", "DELETE FROM audit_events WHERE action = 'model.edit' AND payload LIKE '%\"version\": 3%'",
     "audit events []"),
    ("version row lost", "DELETE FROM model_versions WHERE number = 2", "not 1..N"),
    ("head not moved", "UPDATE models SET head_number = 2", "is not version 3"),
    ("parent wrong", "UPDATE model_versions SET parent_id = NULL WHERE number = 3", "parent is not v2"),
    ("edit twice", "UPDATE model_versions SET message = 'prune water' WHERE number = 3", "more than once"),
])
def test_the_checker_finds_a_torn_edit(history, what, sql, expected):
    workspace, _ = history
    damage(workspace, sql)
    problems = check_database(workspace)
    assert any(expected in p for p in problems), (what, problems)


def test_the_checker_finds_a_missing_artifact(history):
    workspace, model_id = history
    with sqlite3.connect(workspace / "pcbm.db") as db:
        (key,) = db.execute("SELECT artifact_key FROM model_versions WHERE number = 3").fetchone()
    (workspace / "artifacts" / key).unlink()
    assert any("artifact" in p for p in check_database(workspace))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_during_commits_loses_or_tears_nothing(tmp_path):
    result = run_crash_loop(ITERATIONS, restart="fork", seed=8, root=tmp_path, log=None)
    print(result)
    assert result["violations"] == []
    assert result["iterations"] == ITERATIONS
    assert result["acknowledged_lost"] == 0
    assert result["acknowledged_commits"] >= ITERATIONS  # the clients did commit between the kills
    assert result["kills_with_commits_in_flight"] >= ITERATIONS // 2  # most kills hit a commit in flight
