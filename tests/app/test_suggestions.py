"""Suggested edits in the app: the JSON endpoint, the panel, and applying proposals as versions.

A small served workspace with a planted shift: class = shape; in train and test each
class sits on "its" background 95% of the time, in test_shifted never. Expected numbers
are recomputed from the workspace files with the library alone.
"""

from pathlib import Path

import pytest
import torch

from app.models import Role
from app.services import history
from app.services.workspace_import import import_workspace
from ml.concepts import ConceptBank
from ml.editing import apply_edits
from ml.embed import EmbeddedDataset
from ml.evaluation import classification_report
from ml.head import SparseLinearHead
from ml.pcbm import PCBM, load_model
from ml.workspace import Workspace

from .pages.helpers import sign_in, text_of
from .workspace_helpers import EMBED_DIM, tiny_backbone  # noqa: F401

CLASSES = ["circle", "square", "triangle"]
BACKGROUNDS = ["water", "grass", "sand"]
CONCEPTS = ["circle", "square", "triangle", "water background", "grass background", "sand background", "red"]
SPLITS = {"train": 240, "test": 120, "test_shifted": 150}
BASE = "/api/v1/models"
HX = {"HX-Request": "true"}


def build(root: Path, spec: str) -> Path:
    gen = torch.Generator().manual_seed(3)
    parts = []
    for split, count in SPLITS.items():
        y = torch.randint(0, 3, (count,), generator=gen)
        if split == "test_shifted":
            bg = (y + torch.randint(1, 3, (count,), generator=gen)) % 3
        else:
            bg = torch.where(torch.rand(count, generator=gen) < 0.95, y, torch.randint(0, 3, (count,), generator=gen))
        e = torch.randn(count, EMBED_DIM, generator=gen)
        e[torch.arange(count), y] += 1.2
        e[torch.arange(count), 3 + bg] += 2.0
        parts.append((split, e, y, bg))
    data = root / "data"
    data.mkdir(parents=True)
    embedded = EmbeddedDataset(
        torch.cat([p[1] for p in parts]), [f"{p[0]}/{i}.png" for p in parts for i in range(len(p[2]))],
        torch.cat([p[2] for p in parts]), list(CLASSES), [p[0] for p in parts for _ in p[2]],
        [BACKGROUNDS[int(b)] for p in parts for b in p[3]], "", str(data.resolve()))
    workspace = Workspace.open(root, create=True)
    path = workspace.new_path("embeddings", "shapes", ".safetensors")
    embedded.save(path)
    workspace.datasets["shapes"] = str(data.resolve())
    workspace.register("embeddings", "shapes", path)
    bank = ConceptBank(list(CONCEPTS), torch.eye(EMBED_DIM)[: len(CONCEPTS)], sources=["text"] * len(CONCEPTS))
    train = embedded.split("train")
    model = PCBM(bank, SparseLinearHead(lam=3e-3), CLASSES).fit(train.embeddings, train.labels)
    directory = workspace.new_path("models", "shapes-pcbm")
    model.save(directory)
    workspace.register("models", "shapes-pcbm", directory)
    workspace.backbone = spec
    workspace.save()
    return root


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory, tiny_backbone):  # noqa: F811
    return build(tmp_path_factory.mktemp("shapes-ws"), tiny_backbone.spec)


@pytest.fixture
def model_id(db, ctx, shapes_dir):
    return import_workspace(db, ctx, shapes_dir)[0]


@pytest.fixture
def researcher(as_role):
    return as_role("researcher")


@pytest.fixture(scope="module")
def data(shapes_dir):
    return EmbeddedDataset.load(shapes_dir / "embeddings" / "shapes.safetensors")


def saved(shapes_dir):
    return load_model(shapes_dir / "models" / "shapes-pcbm")


def accuracy(model, part):
    return classification_report(model.decision_function(part.embeddings), part.labels)["accuracy"]


def suggest(client, model_id, headers, method, **params):
    response = client.post(f"{BASE}/{model_id}/suggestions", json={"method": method, "params": params},
                           headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


class TestEndpoint:
    def test_tfti_proposals_carry_evidence_and_previews_on_every_split(self, client, model_id, researcher,
                                                                       shapes_dir, data):
        body = suggest(client, model_id, researcher, "tfti", shots=4, seed=1, max_source_drop=1)
        assert body["version"] == 1 and body["params"]["target_split"] == "test_shifted"
        assert body["shots"]["n"] == 12 and len(body["shots"]["images"]) == 12
        assert body["proposals"], "the planted shift must produce proposals"
        model = saved(shapes_dir)
        held = "test_shifted (without the shots)"
        for proposal in body["proposals"]:
            assert proposal["source"] == "tfti" and {e["source"] for e in proposal["edits"]} == {"tfti"}
            assert proposal["evidence"]["shots"]["n_images"] == 12
            splits = {s["name"]: s for s in proposal["preview"]}
            assert set(splits) == {"train", "test", "test_shifted", held}
            assert splits[held]["n"] == SPLITS["test_shifted"] - 12
            edited, _ = apply_edits(model, proposal["edits"])
            for name in ("train", "test", "test_shifted"):
                assert splits[name]["accuracy"]["after"] == accuracy(edited, data.split(name))
        masked = {c for p in body["proposals"] if p["kind"] == "mask" for c in p["concepts"]}
        assert masked and masked <= {f"{b} background" for b in BACKGROUNDS}
        combined = {s["name"]: s for s in body["combined"]["preview"]}
        assert combined[held]["accuracy"]["delta"] > 0.05

    def test_greedy_and_spurious(self, client, model_id, researcher):
        body = suggest(client, model_id, researcher, "greedy", k=3, metric="worst_group")
        assert body["params"] == {"split": "test_shifted", "k": 3, "metric": "worst_group", "per_class": False}
        sizes = [len(p["edits"]) for p in body["proposals"]]
        assert sizes == list(range(1, len(sizes) + 1)) and sizes  # each proposal is a prefix of the path
        afters = [next(s for s in p["preview"] if s["name"] == "test_shifted")["worst_group"]["after"]["accuracy"]
                  for p in body["proposals"]]
        assert afters == [p["evidence"]["after"] for p in body["proposals"]]
        ranked = suggest(client, model_id, researcher, "spurious", top=3)
        assert ranked["params"] == {"split": "all", "top": 3}
        assert {r["concept"] for r in ranked["ranking"][:3]} == {f"{b} background" for b in BACKGROUNDS}
        assert all(p["edits"] == [{"op": "prune", "concept": p["concepts"][0], "class_name": None, "value": None,
                                   "source": "spurious"}] for p in ranked["proposals"])

    def test_bad_requests(self, client, model_id, researcher):
        url = f"{BASE}/{model_id}/suggestions"
        cases = [{"method": "magic"}, {"method": "tfti", "params": {"shots": 0}},
                 {"method": "tfti", "params": {"nope": 1}}, {"method": "tfti", "params": {"target_split": "zzz"}},
                 {"method": "tfti", "params": {"shot_ids": ["not/there.png"]}}]
        for body in cases:
            response = client.post(url, json=body, headers=researcher)
            assert response.status_code == 422, (body, response.text)
        assert client.post(f"{BASE}/999/suggestions", json={"method": "tfti"}, headers=researcher).status_code == 404

    def test_permissions(self, client, model_id, as_role):
        url = f"{BASE}/{model_id}/suggestions"
        assert client.post(url, json={"method": "tfti"}).status_code == 401
        assert client.post(url, json={"method": "tfti"}, headers=as_role("participant")).status_code == 403
        assert client.post(url, json={"method": "tfti"}, headers=as_role("admin")).status_code == 200


class TestApplying:
    def test_committed_proposals_are_versions_whose_edits_keep_their_source(self, client, db, model_id,
                                                                           researcher, shapes_dir, data):
        body = suggest(client, model_id, researcher, "tfti", shots=4, seed=1, max_source_drop=1)
        edits = body["combined"]["edits"]
        response = client.post(f"{BASE}/{model_id}/edits", headers=researcher,
                               json={"base_version": body["version"], "edits": edits, "message": "tf-tti"})
        assert response.status_code == 201, response.text
        version = response.json()
        assert version["number"] == 2
        stored = history.get_version(db, model_id, 2)
        assert [e["source"] for e in stored.edit["edits"]] == ["tfti"] * len(edits)
        assert {r["source"] for r in stored.edit["records"]} == {"tfti"}
        # the committed head is the previewed one: its metrics are the combined preview's
        edited, _ = apply_edits(saved(shapes_dir), edits)
        combined = {s["name"]: s for s in body["combined"]["preview"]}
        for name in ("train", "test", "test_shifted"):
            assert stored.metrics[name]["accuracy"] == combined[name]["accuracy"]["after"]
            assert stored.metrics[name]["accuracy"] == accuracy(edited, data.split(name))
        # proposals are made for the new head next time
        assert suggest(client, model_id, researcher, "greedy", k=1)["version"] == 2


class TestPanel:
    @pytest.fixture
    def browser(self, client, db, make_user):
        return sign_in(client, db, make_user(Role.RESEARCHER, name="rita"))

    def test_model_page_loads_the_panel(self, client, model_id, browser):
        page = client.get("/models/shapes-pcbm")
        assert page.status_code == 200 and 'hx-get="/models/shapes-pcbm/suggestions"' in page.text
        empty = client.get("/models/shapes-pcbm/suggestions", headers=HX)
        assert empty.status_code == 200 and "<html" not in empty.text
        assert 'id="suggestions"' in empty.text and "Apply this" not in text_of(empty.text)

    def test_apply_one_and_several_with_one_click(self, client, db, model_id, browser):
        page = client.get("/models/shapes-pcbm/suggestions", headers=HX,
                          params={"method": "spurious", "top": 2})
        assert page.status_code == 200
        text = text_of(page.text)
        assert "Apply this" in text and "Apply selected" in text and "background" in text
        full = client.get("/models/shapes-pcbm/suggestions", params={"method": "spurious", "top": 2})
        assert full.status_code == 200 and "<html" in full.text and "Apply selected" in text_of(full.text)
        one = '[{"op":"prune","concept":"water background","source":"spurious"}]'
        two = '[{"op":"prune","concept":"grass background","source":"spurious"}]'
        response = client.post("/models/shapes-pcbm/suggestions/apply", follow_redirects=False,
                               data={"csrf_token": browser, "base_version": 1, "only": one, "proposal": [two]})
        assert response.status_code == 303
        v2 = history.get_version(db, model_id, 2)
        assert [(e["concept"], e["source"]) for e in v2.edit["edits"]] == [("water background", "spurious")]
        response = client.post("/models/shapes-pcbm/suggestions/apply", follow_redirects=False,
                               data={"csrf_token": browser, "base_version": 2, "proposal": [one, two],
                                     "message": "both"})
        assert response.status_code == 303
        db.rollback()  # end the read transaction that saw version 2
        v3 = history.get_version(db, model_id, 3)
        assert [e["concept"] for e in v3.edit["edits"]] == ["water background", "grass background"]
        assert v3.message == "both"
        stale = client.post("/models/shapes-pcbm/suggestions/apply", follow_redirects=False,
                            data={"csrf_token": browser, "base_version": 1, "only": one})
        assert stale.status_code == 409
        nothing = client.post("/models/shapes-pcbm/suggestions/apply", follow_redirects=False,
                              data={"csrf_token": browser, "base_version": 3})
        assert nothing.status_code == 422

    def test_a_refused_request_says_why_in_the_panel(self, client, model_id, browser):
        page = client.get("/models/shapes-pcbm/suggestions", headers=HX,
                          params={"method": "tfti", "target_split": "nope"})
        assert page.status_code == 200 and "unknown target split" in text_of(page.text)
