"""Building from the app: embed a dataset, build a concept bank, train a model, as jobs.

The server here is the real app on a copy of the tiny workspace (a real tiny open_clip
checkpoint and real image files). Jobs run synchronously with ``ctx.runner.run_once()``;
what they produce is checked against the library run directly on the same files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from app.main import create_app
from ml.backbone import load_backbone
from ml.concepts import ConceptBank, text_concept_bank
from ml.data import open_image
from ml.embed import EmbeddedDataset, embed_images
from ml.pcbm import load_model
from ml.workflows import split_reports
from ml.workspace import Workspace

from .conftest import make_settings
from .pages.helpers import sign_in
from .workspace_helpers import CLASSES, SPLITS, copy_workspace, tiny_backbone, tiny_workspace  # noqa: F401

API = "/api/v1"


@pytest.fixture
def root(tmp_path: Path, tiny_workspace: Path, sqlite_template: Path) -> Path:
    root = copy_workspace(tiny_workspace, tmp_path / "ws")
    shutil.copy(sqlite_template, root / "pcbm.db")
    return root


@pytest.fixture
def app(root: Path):
    return create_app(make_settings(root))


@pytest.fixture
def researcher(as_role):
    return as_role("researcher")


def run_job(ctx, client, headers, job_id: int) -> dict:
    assert ctx.runner.run_once() == job_id
    return client.get(f"{API}/jobs/{job_id}", headers=headers).json()


class TestEmbedDataset:
    def test_embeds_the_folder_and_lists_it(self, client, ctx, root, researcher, tiny_backbone):
        response = client.post(f"{API}/datasets", headers=researcher, json={"name": "again", "path": "data"})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["kind"] == "embed" and job["status"] == "queued"
        finished = run_job(ctx, client, researcher, job["id"])
        assert finished["status"] == "done" and finished["progress"] == 1.0, finished
        n = sum(SPLITS.values())
        assert finished["result"]["n_images"] == n and finished["result"]["classes"] == CLASSES

        listed = {d["name"]: d for d in client.get(f"{API}/datasets", headers=researcher).json()}
        assert set(listed) == {"toy", "again"} and listed["again"]["n_images"] == n

        # The stored vectors are the backbone's, image by image.
        embedded = EmbeddedDataset.load(Workspace.open(root).path_for("embeddings", "again"))
        backbone = load_backbone(tiny_backbone.spec, device="cpu")
        first = embedded.image_ids[0]
        direct = embed_images(backbone, [open_image(root / "data" / first)])
        torch.testing.assert_close(embedded.embeddings[:1], direct, rtol=0, atol=1e-5)
        assert sorted(set(embedded.splits)) == sorted(SPLITS)

    @pytest.mark.parametrize("path", ["../outside", "..%2F..%2Fetc", "/etc", "data/../../x", "nowhere", "0" * 1000])
    def test_paths_outside_the_data_root_or_missing_are_422(self, client, researcher, path):
        response = client.post(f"{API}/datasets", headers=researcher, json={"name": "bad", "path": path})
        assert response.status_code == 422 and "data root" in response.json()["error"]["message"]

    def test_a_taken_name_is_409_and_a_bad_name_422(self, client, researcher, root):
        before = (root / "workspace.json").read_bytes()
        taken = client.post(f"{API}/datasets", headers=researcher, json={"name": "toy", "path": "data"})
        assert taken.status_code == 409 and "already exists" in taken.json()["error"]["message"]
        bad = client.post(f"{API}/datasets", headers=researcher, json={"name": "../x", "path": "data"})
        assert bad.status_code == 422
        assert (root / "workspace.json").read_bytes() == before

    def test_a_second_request_for_the_same_name_while_queued_is_409(self, client, researcher):
        assert client.post(f"{API}/datasets", headers=researcher, json={"name": "twice", "path": "data"}).status_code == 202
        again = client.post(f"{API}/datasets", headers=researcher, json={"name": "twice", "path": "data"})
        assert again.status_code == 409 and "already making" in again.json()["error"]["message"]

    def test_cancelled_before_it_runs_registers_nothing(self, client, ctx, root, researcher):
        job = client.post(f"{API}/datasets", headers=researcher, json={"name": "never", "path": "data"}).json()
        assert client.post(f"{API}/jobs/{job['id']}/cancel", headers=researcher).status_code == 200
        ctx.runner.run_once()
        assert client.get(f"{API}/jobs/{job['id']}", headers=researcher).json()["status"] == "cancelled"
        assert "never" not in Workspace.open(root).embeddings

    def test_a_folder_that_is_no_dataset_fails_the_job_with_the_reason(self, client, ctx, root, researcher):
        (root / "empty").mkdir()
        job = client.post(f"{API}/datasets", headers=researcher, json={"name": "empty", "path": "empty"}).json()
        finished = run_job(ctx, client, researcher, job["id"])
        assert finished["status"] == "failed" and "empty" in finished["error"]
        assert "internal error" not in finished["error"]
        assert "empty" not in Workspace.open(root).embeddings

    def test_participants_may_not(self, client, as_role):
        headers = as_role("participant")
        assert client.post(f"{API}/datasets", headers=headers, json={"name": "x", "path": "data"}).status_code == 403
        assert client.get(f"{API}/datasets", headers=headers).status_code == 403


class TestConceptBank:
    def test_a_text_bank_holds_the_text_towers_vectors(self, client, ctx, root, researcher, tiny_backbone):
        phrases = ["feathers", "water background"]
        job = client.post(f"{API}/banks", headers=researcher,
                          json={"name": "typed", "kind": "text", "phrases": phrases}).json()
        assert run_job(ctx, client, researcher, job["id"])["status"] == "done"
        listed = {b["name"]: b for b in client.get(f"{API}/banks", headers=researcher).json()}
        assert listed["typed"]["concepts"] == ["feathers", "water background"]
        stored = ConceptBank.load(Workspace.open(root).path_for("banks", "typed"))
        direct = text_concept_bank(load_backbone(tiny_backbone.spec, device="cpu"), phrases)
        torch.testing.assert_close(stored.vectors, direct.vectors, rtol=0, atol=1e-6)

    @pytest.mark.parametrize("body, status", [
        ({"name": "b", "kind": "text", "phrases": []}, 422),
        ({"name": "b", "kind": "text", "phrases": ["a", "a"]}, 422),
        ({"name": "b", "kind": "cav"}, 422),
        ({"name": "b", "kind": "cav", "examples": "../../etc"}, 422),
        ({"name": "b", "kind": "sparkles", "phrases": ["a"]}, 422),
        ({"name": "concepts", "kind": "text", "phrases": ["a"]}, 409),
    ])
    def test_bad_requests_name_the_problem(self, client, researcher, body, status):
        response = client.post(f"{API}/banks", headers=researcher, json=body)
        assert response.status_code == status and response.json()["error"]["message"]


class TestTrainModel:
    def test_trains_registers_and_serves_version_1(self, client, ctx, root, researcher):
        job = client.post(f"{API}/models", headers=researcher,
                          json={"name": "fresh", "embeddings": "toy", "bank": "concepts", "lam": 0.02}).json()
        finished = run_job(ctx, client, researcher, job["id"])
        assert finished["status"] == "done", finished
        model_id = finished["result"]["model_id"]
        assert finished["result"]["url"] == "/models/fresh"

        model = client.get(f"{API}/models/{model_id}", headers=researcher).json()
        assert model["name"] == "fresh" and model["kind"] == "pcbm" and model["head_version"] == 1
        version = client.get(f"{API}/models/{model_id}/versions/1", headers=researcher).json()
        saved = load_model(Workspace.open(root).path_for("models", "fresh"))
        embedded = EmbeddedDataset.load(root / "embeddings" / "toy.safetensors")
        expected = split_reports(saved, embedded)
        for split, report in expected.items():
            assert version["metrics"][split]["accuracy"] == pytest.approx(report["accuracy"])
        # served: the concept weights are the saved head's
        weights = client.get(f"{API}/models/{model_id}/concepts", headers=researcher,
                             params={"class_name": CLASSES[0]}).json()
        assert weights["version"] == 1

    def test_unknown_inputs_are_404_and_taken_names_409(self, client, researcher):
        for body, status in (({"name": "m", "embeddings": "nope", "bank": "concepts"}, 404),
                             ({"name": "m", "embeddings": "toy", "bank": "nope"}, 404),
                             ({"name": "pcbm", "embeddings": "toy", "bank": "concepts"}, 409),
                             ({"name": "m", "embeddings": "toy", "bank": "concepts", "lam": -1}, 422)):
            response = client.post(f"{API}/models", headers=researcher, json=body)
            assert response.status_code == status, (body, response.text)


class TestBuildPage:
    def test_the_page_lists_and_the_forms_queue_jobs(self, client, ctx, db, make_user):
        token = sign_in(client, db, make_user("researcher"))
        page = client.get("/build")
        assert page.status_code == 200
        assert 'data-name="toy"' in page.text and 'data-name="concepts"' in page.text
        refused = client.post("/build/dataset", data={"csrf_token": token, "name": "x", "path": "../up"})
        assert refused.status_code == 422 and "data root" in refused.text and 'value="../up"' in refused.text
        queued = client.post("/build/model", data={"csrf_token": token, "name": "from-page", "embeddings": "toy",
                                                   "bank": "concepts", "lam": "0.02"}, follow_redirects=False)
        assert queued.status_code == 303 and queued.headers["location"].startswith("/jobs/")
        job_id = int(queued.headers["location"].rsplit("/", 1)[1])
        assert ctx.runner.run_once() == job_id
        job_page = client.get(f"/jobs/{job_id}")
        assert "Training model from-page" in job_page.text and "/models/from-page" in job_page.text
