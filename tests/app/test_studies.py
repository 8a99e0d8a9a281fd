"""User studies: set-up, invitations, participants' work, closing, baselines, agreement, export.

The world is tests/app/pages/world.py: birds are seen on water in training and the head
leans on "water"; in ``test_shifted`` (the study's held-out target split) the backgrounds
flip. Expected accuracies are recomputed here with the library alone (``load_model``,
``apply_edits``, ``decision_function``), never with the study services.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
import time
import zipfile
from datetime import timedelta
from itertools import combinations

import pyarrow.parquet as pq
import pytest
import torch
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from app import cli
from app.db import utcnow
from app.models import Model, ModelVersion, Role, User
from app.models_studies import Participant, StudyEvent
from app.services import history, studies
from app.services.model_service import SplitData
from app.services.study_analysis import (
    agreement,
    baselines,
    fleiss_kappa,
    pairwise_jaccard,
    random_prunes,
)
from app.services.study_events import Actor, StudyEventLog
from ml.concepts import ConceptBank
from ml.editing import apply_edits
from ml.embed import EmbeddedDataset
from ml.evaluation import EvalCache
from ml.head import SparseLinearHead
from ml.pcbm import PCBM, load_model

from .pages.helpers import hidden_value, text_of
from .study_helpers import ALL_TOOLS, join, open_study, served_model, study_world_dir  # noqa: F401

API = "/api/v1/studies"
ME = f"{API}/me"
TARGET, SHOWN = "test_shifted", "test"
CONDITIONS = [{"name": "full", "tools": ALL_TOOLS}, {"name": "weights only", "tools": []}]


@pytest.fixture
def model_id(db, ctx, study_world_dir):
    return served_model(db, ctx, study_world_dir)


@pytest.fixture
def owner(make_user):
    return make_user(Role.RESEARCHER, name="rita")


@pytest.fixture
def staff(token_headers, owner):
    return token_headers(owner)


@pytest.fixture
def study(db, owner, model_id):
    return open_study(db, owner, model_id, conditions=[CONDITIONS[0]])


@pytest.fixture
def me(db, ctx, owner, study):
    """One participant of ``study`` (full tools): their bearer headers."""
    return join(db, ctx, owner, study.id)[2]


def prune(concept, class_name="bird"):
    return {"concept": concept, "class_name": class_name}


def commit(client, headers, version, *prunes):
    return client.post(f"{ME}/edits", headers=headers, json={"base_version": version, "prunes": list(prunes)})


def expected_accuracy(world, prunes, split=TARGET):
    """Accuracy of the world's model with ``prunes`` on ``split``, by the library alone."""
    model = load_model(world / "models" / "tiny-pcbm")
    if prunes:
        model, _ = apply_edits(model, [{"op": "prune", **p} for p in prunes])
    data = EmbeddedDataset.load(world / "embeddings" / "tiny.safetensors").split(split)
    predictions = model.decision_function(data.embeddings).argmax(1)
    return int((predictions == data.labels).sum()) / len(data.labels)


# ---------------------------------------------------------------- set-up
class TestConfiguration:
    def test_defaults_hide_the_shifted_split_and_show_the_in_distribution_one(self, client, staff, model_id):
        body = client.post(API, headers=staff, json={"name": "s", "base_model_id": model_id, "task": "t"}).json()
        assert body["status"] == "draft" and body["base_version"] == 1
        assert (body["target_split"], body["in_distribution_split"], body["shown_splits"]) == (TARGET, SHOWN, [SHOWN])
        assert body["conditions"] == [{"name": "default", "tools": ["weights", "preview"]}]
        every = client.post(API, headers=staff, json={"name": "s", "base_model_id": model_id, "task": "t",
                                                     "visible_splits": "all"}).json()
        assert every["shown_splits"] == ["test", "train"]  # everything but the target

    @pytest.mark.parametrize("bad, fragment", [
        ({"target_split": "nope"}, "target split"),
        ({"target_split": "test", "in_distribution_split": "test"}, "cannot be the held-out"),
        ({"visible_splits": "none", "tools": ["preview"]}, "needs visible splits"),
        ({"conditions": [{"name": "a", "tools": []}, {"name": "A", "tools": []}]}, "listed twice"),
        ({"conditions": [{"name": "bad/name", "tools": []}]}, "invalid condition name"),
    ])
    def test_refuses_inconsistent_set_ups(self, client, staff, model_id, bad, fragment):
        response = client.post(API, headers=staff, json={"name": "s", "base_model_id": model_id, "task": "t", **bad})
        assert response.status_code == 422 and fragment in response.json()["error"]["message"]

    def test_only_a_draft_can_change(self, client, staff, model_id):
        sid = client.post(API, headers=staff, json={"name": "s", "base_model_id": model_id, "task": "t"}).json()["id"]
        changed = client.patch(f"{API}/{sid}", headers=staff, json={"task": "new task", "edit_budget": 2}).json()
        assert (changed["task"], changed["edit_budget"]) == ("new task", 2)
        assert client.post(f"{API}/{sid}/open", headers=staff).json()["status"] == "open"
        refused = client.patch(f"{API}/{sid}", headers=staff, json={"task": "again"})
        assert refused.status_code == 409

    def test_studies_are_private_to_their_owner_and_admins(self, client, staff, study, as_role):
        other, admin = as_role("researcher"), as_role("admin")
        assert client.get(f"{API}/{study.id}", headers=other).status_code == 404
        assert client.get(API, headers=other).json() == []
        assert client.get(f"{API}/{study.id}", headers=admin).status_code == 200
        assert [s["id"] for s in client.get(API, headers=staff).json()] == [study.id]


# ---------------------------------------------------------------- joining
class TestJoining:
    def test_an_invitation_works_once(self, client, staff, study):
        code = client.post(f"{API}/{study.id}/invitations", headers=staff, json={"count": 1}).json()["codes"][0]
        first = client.post(f"{API}/join", json={"code": code, "consent": True})
        assert first.status_code == 201 and first.json()["study"]["task"] == study.task
        assert client.post(f"{API}/join", json={"code": code, "consent": True}).status_code == 404
        assert client.post(f"{API}/join", json={"code": "inv_made-up", "consent": True}).status_code == 404

    def test_joining_needs_consent_and_an_open_study(self, client, db, staff, owner, model_id):
        draft = open_study(db, owner, model_id, open_it=False)
        code = studies.create_invitations(db, owner, draft.id, 1)[0]
        assert client.post(f"{API}/join", json={"code": code, "consent": True}).status_code == 409
        studies.open_study(db, owner, draft.id)
        assert client.post(f"{API}/join", json={"code": code, "consent": False}).status_code == 422
        studies.close_study(db, owner, draft.id)
        assert client.post(f"{API}/join", json={"code": code, "consent": True}).status_code == 409

    def test_conditions_are_balanced(self, db, ctx, owner, model_id):
        three = [{"name": n, "tools": []} for n in ("a", "b", "c")]
        found = open_study(db, owner, model_id, conditions=three)
        codes = studies.create_invitations(db, owner, found.id, 7)
        for code in codes:
            studies.join(db, ctx.artifacts, code, consent=True)
        counts = dict(db.execute(select(Participant.condition, func.count()).where(Participant.study_id == found.id)
                                 .group_by(Participant.condition)).all())
        assert sorted(counts.values()) == [2, 2, 3]

    def test_each_participant_edits_a_copy_of_the_base_version(self, db, ctx, owner, study, model_id):
        participant, user, _ = join(db, ctx, owner, study.id)
        assert user.role == Role.PARTICIPANT and user.password_hash is None
        assert participant.pseudonym in user.name and participant.model_id not in (None, model_id)
        copy = history.get_version(db, participant.model_id, 1)
        base = history.get_version(db, model_id, study.base_version)
        assert copy.weights_hash == base.weights_hash and copy.author_id == user.id

    def test_copies_stay_off_the_model_lists_unless_asked_for(self, client, db, ctx, staff, owner, study, model_id):
        participant, _, _ = join(db, ctx, owner, study.id)
        listed = [m["id"] for m in client.get("/api/v1/models", headers=staff).json()]
        assert model_id in listed and participant.model_id not in listed
        everything = client.get("/api/v1/models", headers=staff, params={"include_study_copies": "true"}).json()
        assert participant.model_id in [m["id"] for m in everything]

    def test_the_invitation_page_consents_and_signs_in(self, client, db, owner, study):
        code = studies.create_invitations(db, owner, study.id, 1)[0]
        page = client.get(studies.join_path(code))
        assert page.status_code == 200 and study.consent_text in text_of(page.text)
        form = {"csrf_token": hidden_value(page.text, "csrf_token"), "code": code}
        again = client.post("/join", data=form, follow_redirects=False)
        assert again.status_code == 422 and "agree" in text_of(again.text)  # the consent box was not ticked
        form["csrf_token"] = hidden_value(again.text, "csrf_token")  # each page has a token of its own
        joined = client.post("/join", data={**form, "consent": "yes"}, follow_redirects=False)
        assert joined.status_code == 303 and joined.headers["location"] == "/participate"
        work = client.get("/participate")
        assert work.status_code == 200 and study.task in text_of(work.text)
        assert client.post("/join", data={**form, "consent": "yes"}).status_code == 403  # the form is spent


# ---------------------------------------------------------------- a participant's work
class TestParticipantWork:
    def test_the_workspace_shows_the_task_tools_budget_and_never_the_target(self, client, me, study):
        body = client.get(ME, headers=me).json()
        assert body["study"] == {"name": study.name, "task": study.task}
        assert body["tools"] == ALL_TOOLS and body["splits"] == [SHOWN] and set(body["accuracy"]) == {SHOWN}
        assert body["budget"] == {"total": 3, "used": 0, "left": 3} and body["version"] == 1
        assert TARGET not in json.dumps(body) and "conditions" not in body

    def test_prunes_count_against_the_budget_and_undo_gives_them_back(self, client, db, me, study):
        assert commit(client, me, 1, prune("water"), prune("grass")).json()["version"] == 2
        assert client.get(ME, headers=me).json()["budget"]["left"] == 1
        over = commit(client, me, 2, prune("striped"), prune("feathers"))
        assert over.status_code == 409 and "budget" in over.json()["error"]["message"]
        assert client.post(f"{ME}/undo", headers=me, json={"base_version": 2}).json() == {
            "version": 3, "undone": 2, "restored": 1}
        assert client.get(ME, headers=me).json()["budget"]["left"] == 3
        assert client.app.state.study_events.flush()
        kinds = [e.kind for e in db.scalars(select(StudyEvent).order_by(StudyEvent.created_at, StudyEvent.id))]
        assert kinds == ["join", "edit_commit", "page_view", "action_refused", "edit_undo", "page_view"]

    @pytest.mark.parametrize("body, status", [
        ({"base_version": 1, "prunes": [prune("sky")]}, 422),  # no weight for bird
        ({"base_version": 1, "prunes": [prune("made-up")]}, 422),
        ({"base_version": 1, "prunes": [{"concept": "water"}]}, 422),  # a class is required
        ({"base_version": 7, "prunes": [prune("water")]}, 409),
    ])
    def test_refused_edits_change_nothing(self, client, me, body, status):
        assert client.post(f"{ME}/edits", headers=me, json=body).status_code == status
        assert client.get(ME, headers=me).json()["version"] == 1

    def test_the_preview_shows_only_the_shown_split(self, client, me, study_world_dir):
        result = client.post(f"{ME}/preview", headers=me, json={"base_version": 1, "prunes": [prune("water")]}).json()
        assert [s["name"] for s in result["splits"]] == [SHOWN]
        split = result["splits"][0]
        assert split["before"] == expected_accuracy(study_world_dir, [], SHOWN)
        assert split["after"] == pytest.approx(expected_accuracy(study_world_dir, [prune("water")], SHOWN))

    def test_tools_follow_the_condition(self, client, db, ctx, owner, model_id):
        bare = open_study(db, owner, model_id, conditions=[CONDITIONS[1]])
        headers = join(db, ctx, owner, bare.id)[2]
        assert client.post(f"{ME}/preview", headers=headers,
                           json={"base_version": 1, "prunes": [prune("water")]}).status_code == 403
        assert client.get(f"{ME}/examples", headers=headers, params={"concept": "water"}).status_code == 403
        assert client.get(f"{ME}/suggestions", headers=headers).status_code == 403
        assert commit(client, headers, 1, prune("water")).status_code == 201  # weights are always there

    def test_example_images_come_from_shown_splits_only(self, client, me, ctx, model_id):
        images = client.get(f"{ME}/examples", headers=me, params={"concept": "water"}).json()["images"]
        assert images and {i["split"] for i in images} == {SHOWN}
        shown = client.get(f"{ME}/images/file", headers=me, params={"id": images[0]["image_id"], "concept": "water"})
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
        hidden = ctx.models.get(model_id).splits[TARGET].image_ids[0]
        assert client.get(f"{ME}/images/file", headers=me, params={"id": hidden}).status_code == 404

    def test_suggestions_are_chosen_without_the_target(self, client, me):
        body = client.get(f"{ME}/suggestions", headers=me).json()
        assert body["split"] == SHOWN and len(body["prunes"]) <= 3

    def test_after_the_time_limit_only_submitting_is_left(self, client, db, me):
        db.execute(update(Participant).values(deadline_at=utcnow() - timedelta(seconds=1)))
        db.commit()
        assert client.get(ME, headers=me).json()["status"] == "time_up"
        assert commit(client, me, 1, prune("water")).status_code == 409
        assert client.post(f"{ME}/submit", headers=me, json={}).status_code == 200

    def test_submitting_ends_the_participants_work(self, client, me):
        assert commit(client, me, 1, prune("water")).status_code == 201
        assert client.post(f"{ME}/submit", headers=me, json={"version": 1}).status_code == 409  # stale
        assert client.post(f"{ME}/submit", headers=me, json={"version": 2}).json()["version"] == 2
        assert client.get(ME, headers=me).json()["status"] == "submitted"
        assert commit(client, me, 2, prune("grass")).status_code == 409
        assert client.post(f"{ME}/submit", headers=me, json={}).status_code == 409


class TestClosing:
    def test_closing_freezes_the_study(self, client, db, ctx, staff, owner, study, me):
        assert commit(client, me, 1, prune("water")).status_code == 201
        code = studies.create_invitations(db, owner, study.id, 1)[0]
        closed = client.post(f"{API}/{study.id}/close", headers=staff, json={"note": "enough data"})
        assert closed.json()["status"] == "closed"
        assert client.get(ME, headers=me).json()["status"] == "closed"
        refused = [
            commit(client, me, 2, prune("grass")),
            client.post(f"{ME}/preview", headers=me, json={"base_version": 2, "prunes": [prune("grass")]}),
            client.post(f"{ME}/undo", headers=me, json={"base_version": 2}),
            client.post(f"{ME}/submit", headers=me, json={}),
            client.post(f"{API}/join", json={"code": code, "consent": True}),
            client.patch(f"{API}/{study.id}", headers=staff, json={"task": "x"}),
            client.post(f"{API}/{study.id}/invitations", headers=staff, json={"count": 1}),
            client.post(f"{API}/{study.id}/open", headers=staff),
        ]
        assert [r.status_code for r in refused] == [409] * len(refused)
        participant = db.scalar(select(Participant))
        assert db.get(Model, participant.model_id).head_number == 2


# ---------------------------------------------------------------- baselines and agreement
def tiny_case():
    """Two classes, three concepts, four images; only pruning (a, spurious) fixes the mistakes.

    logit_a = z_signal + 2 z_spurious, logit_b = 0. Images (label, z_signal, z_spurious):
    (a, 1, -1) wrong, (a, 1, 1) right, (b, -1, -1) right, (b, -1, 1) wrong: accuracy 1/2.
    Pruning (a, spurious): all right. Pruning (a, signal): 1/2. Both: every logit 0, argmax
    picks a: 1/2.
    """
    z = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    bank = ConceptBank(names=["signal", "spurious", "noise"], vectors=torch.eye(3), sources=["text"] * 3,
                       info=[{}, {}, {}])
    config = {"kind": "sparse_linear_head", "lam": 1e-3, "l1_ratio": 0.99, "standardize": True, "max_iter": 1,
              "tol": 1e-6}
    tensors = {"weight": torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]), "bias": torch.zeros(2),
               "mean": torch.zeros(3), "scale": torch.ones(3)}

    def with_head(_entry, state):
        return PCBM(bank, SparseLinearHead.from_state(state.tensors, state.config), ["a", "b"])

    base = history.HeadState(tensors=tensors, config=config)
    cache = EvalCache.build(with_head(None, base), (z, labels))
    return SplitData("target", cache, [f"img{i}" for i in range(4)], None), base, with_head


class TestBaselines:
    def test_the_oracle_finds_the_one_helpful_prune_and_stops(self):
        split, base, with_head = tiny_case()
        found = baselines(None, split, base, "case-1", k=2, seeds=6, with_head=with_head)
        assert found["oracle"]["prunes"] == [(0, 1)] and found["oracle"]["accuracy"] == 1.0

    def test_random_pruning_averages_known_single_prunes(self):
        split, base, with_head = tiny_case()
        by_prune = {(0, 0): 0.5, (0, 1): 1.0}
        found = baselines(None, split, base, "case-2", k=1, seeds=12, with_head=with_head)["random"]
        runs = found["runs"]
        assert [r["accuracy"] for r in runs] == [by_prune[r["prunes"][0]] for r in runs]
        assert {r["prunes"][0] for r in runs} == set(by_prune)  # both drawn in 12 seeds
        assert found["mean"] == math.fsum(r["accuracy"] for r in runs) / 12
        everything = baselines(None, split, base, "case-3", k=2, seeds=5, with_head=with_head)["random"]
        assert (everything["mean"], everything["std"]) == (0.5, 0.0)

    def test_random_draws_depend_only_on_the_seed(self):
        candidates = [(0, c) for c in range(10)]
        assert random_prunes(candidates, 3, seed=4) == random_prunes(candidates, 3, seed=4)
        assert len(set(random_prunes(candidates, 3, seed=4))) == 3


class TestAgreement:
    def test_fleiss_kappa_of_the_textbook_example(self):
        # Fleiss (1971) as reproduced on Wikipedia: 10 items, 14 raters, 5 categories, kappa 0.210.
        table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                 [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
        assert fleiss_kappa(table) == pytest.approx(0.20993, abs=5e-5)

    def test_fleiss_kappa_limits(self):
        assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == pytest.approx(1.0)
        assert fleiss_kappa([[3, 0], [3, 0]]) is None  # every rating alike: undefined
        assert fleiss_kappa([[1, 0]]) is None  # one rater
        with pytest.raises(ValueError):
            fleiss_kappa([[2, 0], [1, 0]])

    def test_pairwise_jaccard(self):
        result = pairwise_jaccard([{1, 2}, {2, 3}, set()])
        assert result == {"pairs": 3, "mean": (1 / 3 + 0 + 0) / 3}
        assert pairwise_jaccard([set(), set()])["mean"] == 1.0
        found = agreement([{(0, 1)}, {(0, 1)}], [(0, 0), (0, 1)])
        assert (found["jaccard_mean"], found["fleiss_kappa"]) == (1.0, pytest.approx(1.0))


# ---------------------------------------------------------------- results and export
@pytest.fixture
def finished(client, db, ctx, owner, model_id):
    """A study with two conditions; three participants prune differently and submit."""
    found = open_study(db, owner, model_id)
    plans = {0: [prune("water")], 1: [prune("grass"), prune("water")], 2: [prune("striped", "cat")]}
    people = []
    for plan in plans.values():
        participant, _, headers = join(db, ctx, owner, found.id)
        client.get(ME, headers=headers)
        client.get(f"{ME}/concepts", headers=headers, params={"class": "bird"})
        client.get(f"{ME}/concept", headers=headers, params={"concept": plan[0]["concept"]})
        assert commit(client, headers, 1, *plan).status_code == 201
        assert client.post(f"{ME}/submit", headers=headers, json={}).status_code == 200
        people.append((participant.pseudonym, participant.condition, plan))
    return found, people


def read_zip(content):
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        return {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}


def csv_rows(data):
    return list(csv.DictReader(io.StringIO(data.decode())))


class TestResultsAndExport:
    def test_the_dashboard_numbers_are_those_of_the_library(self, client, staff, finished, study_world_dir):
        found, people = finished
        results = client.get(f"{API}/{found.id}/results", headers=staff).json()
        assert results["base"]["accuracy"] == expected_accuracy(study_world_dir, [])
        accuracy = {p["pseudonym"]: p["target_accuracy"] for p in results["participants"]}
        for pseudonym, _, plan in people:
            assert accuracy[pseudonym] == expected_accuracy(study_world_dir, plan)
        assert results["agreement"]["raters"] == 3 and results["agreement"]["jaccard_mean"] == pytest.approx(
            (1 / 2 + 0 + 0) / 3)
        page = client.get(f"/studies/{found.id}", headers=staff)
        assert page.status_code == 200
        for pseudonym, _, _ in people:
            assert f'data-pseudonym="{pseudonym}" data-accuracy="{accuracy[pseudonym]}"' in page.text

    def test_the_export_holds_every_logged_action(self, client, db, staff, finished):
        found, _ = finished
        bundle = client.get(f"{API}/{found.id}/export", headers=staff, params={"format": "json"}).json()
        stored = db.scalar(select(func.count()).select_from(StudyEvent).where(StudyEvent.study_id == found.id))
        events = bundle["tables"]["events"]
        assert len(events) == stored == 3 * 6  # join, page view, class, concept, commit, submit
        assert [e["kind"] for e in events[:1]] == ["join"]
        per_kind = {kind: sum(e["kind"] == kind for e in events) for kind in {e["kind"] for e in events}}
        assert per_kind == {"join": 3, "page_view": 3, "class_view": 3, "concept_inspect": 3, "edit_commit": 3,
                            "submit": 3}
        assert all(e["pseudonym"] and e["created_at"] and e["model_version"] for e in events)

    @pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
    def test_the_export_reproduces_the_dashboard_exactly(self, client, staff, finished, fmt):
        found, _ = finished
        results = client.get(f"{API}/{found.id}/results", headers=staff).json()
        response = client.get(f"{API}/{found.id}/export", headers=staff, params={"format": fmt})
        if fmt == "json":
            tables = {name: rows for name, rows in response.json()["tables"].items()}
            runs, participants, prunes = tables["random_runs"], tables["participants"], tables["prunes"]
        else:
            files = read_zip(response.content)
            assert set(files) == {f"{t}.{fmt}" for t in ("events", "participants", "submissions", "prunes",
                                                          "baselines", "random_runs")} | {"study.json"}
            if fmt == "csv":
                read = {name: csv_rows(files[f"{name}.csv"]) for name in ("random_runs", "participants", "prunes")}
            else:
                read = {name: pq.read_table(io.BytesIO(files[f"{name}.parquet"])).to_pylist()
                        for name in ("random_runs", "participants", "prunes")}
            runs, participants, prunes = read["random_runs"], read["participants"], read["prunes"]
        # per-participant accuracy and the per-condition means, exactly
        accuracy = {p["pseudonym"]: float(p["target_accuracy"]) for p in participants}
        assert accuracy == {p["pseudonym"]: p["target_accuracy"] for p in results["participants"]}
        for name, condition in results["conditions"].items():
            values = [float(p["target_accuracy"]) for p in participants if p["condition"] == name]
            assert condition["mean"] == (math.fsum(values) / len(values) if values else None)
        assert results["random"]["mean"] == math.fsum(float(r["target_accuracy"]) for r in runs) / len(runs)
        # agreement from the prunes table, computed here by hand
        sets = {}
        for row in prunes:
            sets.setdefault(row["pseudonym"], set()).add((row["class_name"], row["concept"]))
        pruned = [sets.get(p, set()) for p in accuracy]
        pairs = [len(a & b) / len(a | b) for a, b in combinations(pruned, 2)]
        assert results["agreement"]["jaccard_mean"] == math.fsum(pairs) / len(pairs)

    def test_one_table_at_a_time(self, client, staff, finished):
        found, _ = finished
        events = client.get(f"{API}/{found.id}/export", headers=staff, params={"format": "csv", "table": "events"})
        assert events.headers["content-type"].startswith("text/csv")
        assert events.text.splitlines()[0] == "id,created_at,pseudonym,condition,kind,model_version,payload"

    def test_the_cli_writes_the_same_export(self, client, staff, finished, workspace, tmp_path, monkeypatch):
        found, _ = finished
        monkeypatch.setenv("PCBM_SECRET_KEY", "x" * 40)
        result = CliRunner().invoke(cli.app, ["study", "export", str(found.id), "--format", "csv", "--out",
                                              str(tmp_path / "out"), "-w", str(workspace)])
        assert result.exit_code == 0, result.output
        written = csv_rows((tmp_path / "out" / "participants.csv").read_bytes())
        served = csv_rows(read_zip(client.get(f"{API}/{found.id}/export", headers=staff).content)["participants.csv"])
        assert written == served
        assert json.loads((tmp_path / "out" / "study.json").read_text())["study"]["id"] == found.id


# ---------------------------------------------------------------- the event log
def _actor(db, ctx, owner, study):
    participant = join(db, ctx, owner, study.id)[0]
    return Actor(study.id, participant.id, participant.pseudonym)


class TestEventLog:
    def test_nothing_queued_is_lost_when_the_log_closes(self, ctx, db, owner, study):
        actor = _actor(db, ctx, owner, study)
        log = StudyEventLog(ctx.session_factory, max_queue=50, batch_size=20)

        def send(n):
            for i in range(n):
                log.log(actor, "page_view", 1, {"i": i})

        threads = [threading.Thread(target=send, args=(150,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        log.close()
        assert log.pending == 0
        stored = db.scalar(select(func.count()).select_from(StudyEvent).where(StudyEvent.kind == "page_view"))
        assert stored == 600

    def test_flush_waits_until_the_events_are_stored(self, ctx, db, owner, study):
        actor = _actor(db, ctx, owner, study)
        log = StudyEventLog(ctx.session_factory)
        for _ in range(30):
            log.log(actor, "map_open", 1, {})
        assert log.flush(timeout_s=10)
        assert db.scalar(select(func.count()).select_from(StudyEvent).where(StudyEvent.kind == "map_open")) == 30
        log.close()
        log.log(actor, "map_open", 1, {})  # after closing: written by the caller
        db.rollback()  # a new read transaction sees it
        assert db.scalar(select(func.count()).select_from(StudyEvent).where(StudyEvent.kind == "map_open")) == 31

    def test_an_event_the_database_refuses_does_not_block_the_others(self, ctx, db, owner, study):
        actor = _actor(db, ctx, owner, study)
        log = StudyEventLog(ctx.session_factory)
        log.log(Actor(999_999, actor.participant_id, "ghost"), "page_view", 1, {})  # no such study
        for _ in range(5):
            log.log(actor, "class_view", 1, {})
        assert log.flush(timeout_s=10)
        log.close()
        assert db.scalar(select(func.count()).select_from(StudyEvent).where(StudyEvent.kind == "class_view")) == 5

    def test_a_slow_database_does_not_slow_a_page_view(self, client, me, monkeypatch):
        assert client.get(ME, headers=me).status_code == 200
        log = client.app.state.study_events
        write = log._insert
        monkeypatch.setattr(log, "_insert", lambda events: (time.sleep(1.0), write(events)))
        start = time.perf_counter()
        assert client.get(ME, headers=me).status_code == 200
        assert time.perf_counter() - start < 0.6  # the event waits in the queue, not the participant
        assert log.flush(timeout_s=10)

    def test_unknown_kinds_are_refused(self, ctx):
        with pytest.raises(ValueError):
            StudyEventLog(ctx.session_factory).log(Actor(1, 1, "p"), "made_up", 1)


def test_participant_versions_are_authored_by_the_participant(client, db, me):
    assert commit(client, me, 1, prune("water")).status_code == 201
    version = db.scalar(select(ModelVersion).order_by(ModelVersion.id.desc()))
    author = db.get(User, version.author_id)
    assert author.role == Role.PARTICIPANT and version.edit["edits"][0]["source"] == "participant"


def test_the_cli_sets_up_opens_invites_and_closes(client, db, owner, model_id, workspace, monkeypatch):
    monkeypatch.setenv("PCBM_SECRET_KEY", "x" * 40)

    def pcbm(*args):
        result = CliRunner().invoke(cli.app, [*args, "-w", str(workspace)])
        assert result.exit_code == 0, result.output
        return result.output

    created = pcbm("study", "create", "From the shell", "--model", "tiny-pcbm", "--task", "Fix it.", "--owner", "rita",
                   "--condition", "a: weights, preview", "--condition", "b: weights", "--budget", "2")
    study_id = int(created.split()[2])
    assert "target split test_shifted" in created
    assert pcbm("study", "open", str(study_id)).strip() == f"study {study_id} is open"
    links = pcbm("study", "invite", str(study_id), "--count", "2", "--base-url", "http://example.test").split()
    assert len(links) == 2 and all(link.startswith("http://example.test/join?code=inv_") for link in links)
    code = links[0].split("code=", 1)[1]
    assert client.post(f"{API}/join", json={"code": code, "consent": True}).status_code == 201
    assert pcbm("study", "close", str(study_id)).strip() == f"study {study_id} is closed"
    failed = CliRunner().invoke(cli.app, ["study", "export", "999", "-w", str(workspace)])
    assert failed.exit_code == 2 and "no study with id 999" in failed.output
