"""Concept maps and concept metrics over HTTP: PNG and JSON maps, uploads, errors, metrics jobs, pages.

Expected maps are recomputed here with the library alone (``ml.cam`` on the workspace's
backbone and bank), never taken from the service.
"""

import io
import json
import time

import pytest
import torch
from PIL import Image

from app.services.maps import map_service
from app.services.workspace_import import import_workspace
from ml import cam
from ml.backbone import load_backbone
from ml.data import open_image
from ml.embed import EmbeddedDataset
from ml.pcbm import load_model

from .workspace_helpers import CLASSES, CONCEPTS, copy_workspace, png_bytes, tiny_backbone, tiny_workspace  # noqa: F401

BASE = "/api/v1/models"
TRAVERSALS = ["../workspace.json", "..%2fworkspace.json", "test/../../workspace.json", "/etc/passwd"]
BACKGROUND = {"water", "grass", "sky"}


@pytest.fixture
def served(db, ctx, tiny_workspace):
    return import_workspace(db, ctx, tiny_workspace)[0]


@pytest.fixture
def researcher(as_role):
    return as_role("researcher")


@pytest.fixture
def image_id(tiny_workspace):
    return EmbeddedDataset.load(tiny_workspace / "embeddings" / "toy.safetensors").split("test").image_ids[0]


def expected_grid(workspace, image_id, concept, method=None):
    model = load_model(workspace / "models" / "pcbm")
    backbone = load_backbone(Workspace_backbone(workspace), device="cpu")
    image = open_image(workspace / "data" / image_id)
    chosen = cam.parse_method(method, backbone.architecture)
    tokens = cam.spatial_tokens(backbone, [image], chosen)
    grid = cam.maps_from_tokens(tokens, model.bank, chosen)
    return grid[0, model.bank.index(concept)]


def Workspace_backbone(workspace):  # noqa: N802 - reads workspace.json like the app does
    return json.loads((workspace / "workspace.json").read_text())["backbone"]


class TestImageMaps:
    def test_json_maps_equal_the_library_and_have_the_input_size(self, client, served, researcher, image_id,
                                                                tiny_workspace):
        response = client.get(f"{BASE}/{served}/images/maps", headers=researcher,
                              params={"id": image_id, "concepts": ["water", "feathers"], "class": "bird"})
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["method"] == cam.DEFAULT_MAP_METHOD["vit"] and body["size"] == [32, 32] and body["grid"] == [2, 2]
        assert [(m["kind"], m["name"]) for m in body["maps"]] == [("concept", "water"), ("concept", "feathers"),
                                                                   ("class", "bird")]
        water = torch.tensor(body["maps"][0]["values"])
        assert water.shape == (32, 32) and torch.isfinite(water).all()
        grid = expected_grid(tiny_workspace, image_id, "water")
        torch.testing.assert_close(water, cam.upsample(grid[None, None], 32)[0, 0], rtol=1e-4, atol=1e-5)
        assert body["maps"][0]["min"] == pytest.approx(float(grid.min()), abs=1e-5)

    def test_comma_separated_concepts_grid_resolution_and_another_method(self, client, served, researcher, image_id,
                                                                         tiny_workspace):
        body = client.get(f"{BASE}/{served}/images/maps", headers=researcher, params={
            "id": image_id, "concepts": "water,grass", "method": "patch", "resolution": "grid"}).json()
        assert body["method"] == "patch" and [m["name"] for m in body["maps"]] == ["water", "grass"]
        torch.testing.assert_close(torch.tensor(body["maps"][1]["values"]),
                                   expected_grid(tiny_workspace, image_id, "grass", "patch"), rtol=1e-4, atol=1e-5)

    def test_class_map_is_in_logit_units(self, client, served, researcher, image_id, tiny_workspace):
        body = client.get(f"{BASE}/{served}/images/maps", headers=researcher,
                          params={"id": image_id, "class": "cat", "resolution": "grid"}).json()
        model = load_model(tiny_workspace / "models" / "pcbm")
        backbone = load_backbone(Workspace_backbone(tiny_workspace), device="cpu")
        tokens = cam.spatial_tokens(backbone, [open_image(tiny_workspace / "data" / image_id)],
                                    cam.parse_method(None, "vit"))
        expected = cam.class_maps(cam.score_maps(tokens, model.bank), model.head, [1])[0, 0]
        torch.testing.assert_close(torch.tensor(body["maps"][0]["values"]), expected, rtol=1e-4, atol=1e-5)

    def test_png_overlay_changes_with_the_concept(self, client, served, researcher, image_id):
        def png(concept, opacity=0.6):
            response = client.get(f"{BASE}/{served}/images/maps", headers=researcher, params={
                "id": image_id, "concepts": concept, "format": "png", "opacity": opacity, "size": 64})
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            assert response.headers["x-map-method"] == cam.DEFAULT_MAP_METHOD["vit"]
            return response.content

        water, grass = png("water"), png("grass")
        assert Image.open(io.BytesIO(water)).size == (64, 64)
        assert water != grass
        assert png("water", 0.0) == png("grass", 0.0)  # no map at all: only the image

    def test_unknown_concept_or_class_is_422_naming_it(self, client, served, researcher, image_id):
        response = client.get(f"{BASE}/{served}/images/maps", headers=researcher,
                              params={"id": image_id, "concepts": ["water", "unicorn"]})
        assert response.status_code == 422
        assert "unicorn" in response.json()["error"]["message"]
        assert response.json()["error"]["detail"]["unknown_concepts"] == ["unicorn"]
        response = client.get(f"{BASE}/{served}/images/maps", headers=researcher,
                              params={"id": image_id, "class": "emu"})
        assert response.status_code == 422 and "emu" in response.json()["error"]["message"]
        nothing = client.get(f"{BASE}/{served}/images/maps", headers=researcher, params={"id": image_id})
        assert nothing.status_code == 422
        two = client.get(f"{BASE}/{served}/images/maps", headers=researcher,
                         params={"id": image_id, "concepts": "water,grass", "format": "png"})
        assert two.status_code == 422 and "one map" in two.json()["error"]["message"]

    def test_traversal_is_refused(self, client, served, researcher):
        for bad in TRAVERSALS:
            response = client.get(f"{BASE}/{served}/images/maps", headers=researcher,
                                  params={"id": bad, "concepts": "water", "format": "png"})
            assert response.status_code in (400, 404), bad
            assert response.headers["content-type"].startswith("application/json")  # an error, never a file

    def test_permissions(self, client, served, as_role, image_id):
        url = f"{BASE}/{served}/images/maps"
        params = {"id": image_id, "concepts": "water"}
        assert client.get(url, params=params).status_code == 401
        assert client.get(url, params=params, headers=as_role("participant")).status_code == 403

    def test_maps_are_cached_by_image_content(self, client, ctx, served, researcher, image_id):
        service = map_service(ctx.models)
        for concept in ("water", "grass", "sky"):
            client.get(f"{BASE}/{served}/images/maps", headers=researcher, params={"id": image_id, "concepts": concept})
        assert service.tokens.misses == 1 and service.tokens.hits >= 2


class TestUploadMaps:
    def test_json_and_colour_only_png(self, client, served, researcher):
        upload = png_bytes((40, 30), (10, 200, 30))
        files = {"image": ("leaf.png", upload, "image/png")}
        body = client.post(f"{BASE}/{served}/maps", headers=researcher, files=files,
                           params={"concepts": "grass", "class": "dog"}).json()
        assert body["image_id"] is None and (body["width"], body["height"]) == (40, 30)
        assert [m["kind"] for m in body["maps"]] == ["concept", "class"]
        response = client.post(f"{BASE}/{served}/maps", headers=researcher, files=files,
                               params={"concepts": "grass", "format": "png", "size": 48})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(response.content)).convert("RGB")
        assert picture.size == (48, 48)
        assert (10, 200, 30) not in {picture.getpixel((x, y)) for x in range(0, 48, 4) for y in range(0, 48, 4)}

    def test_bad_uploads_never_echo_the_bytes(self, client, served, researcher):
        secret = b"not an image: SECRET-PAYLOAD-1234"
        response = client.post(f"{BASE}/{served}/maps", headers=researcher, params={"concepts": "grass"},
                               files={"image": ("x.png", secret, "image/png")})
        assert response.status_code in (400, 415) and b"SECRET-PAYLOAD" not in response.content
        unknown = client.post(f"{BASE}/{served}/maps", headers=researcher, params={"concepts": "SECRET-PAYLOAD-1234x"},
                              files={"image": ("x.png", png_bytes(), "image/png")})
        assert unknown.status_code == 422
        assert client.post(f"{BASE}/{served}/maps", headers=researcher, params={"concepts": "grass"}).status_code == 422


# ---------------------------------------------------------------------------- concept metrics
def annotate(workspace):
    """Masks, attributes and concept kinds for the tiny workspace's images (a demo-world layout)."""
    data = workspace / "data"
    embedded = EmbeddedDataset.load(workspace / "embeddings" / "toy.safetensors")
    (data / "masks").mkdir()
    rows = ["image,concept,present"]
    for i, image_id in enumerate(embedded.image_ids):
        width, height = Image.open(data / image_id).size
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (0, 0, max(1, width // 2), max(1, height // 2)))
        mask.save(data / "masks" / f"{image_id.rsplit('/', 1)[-1][:-4]}.png")
        label = CLASSES[int(embedded.labels[i])]
        present = {"bird": {"feathers", "wings", "beak"}, "cat": {"whiskers", "stripes"},
                   "dog": {"snout", "paws"}}[label]
        present = present | {"water" if embedded.groups[i] == "water" else "grass"}
        rows += [f"{image_id},{c},{int(c in present)}" for c in CONCEPTS]
    (data / "attributes.csv").write_text("\n".join(rows) + "\n")
    (data / "world.json").write_text(json.dumps({"concepts": [
        {"name": c, "kind": "background" if c in BACKGROUND else "object",
         "group": "bg" if c in BACKGROUND else "thing"}
        for c in CONCEPTS]}))
    return workspace


@pytest.fixture
def annotated(db, ctx, tmp_path, tiny_workspace):
    workspace = annotate(copy_workspace(tiny_workspace, tmp_path / "annotated"))
    return import_workspace(db, ctx, workspace)[0]


def wait_ready(client, headers, model_id, **params):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = client.get(f"{BASE}/{model_id}/concept-metrics", headers=headers, params={"wait": 5, **params})
        if response.status_code != 202:
            return response
        assert response.json()["status"] == "running" and response.headers["retry-after"]
    raise AssertionError("concept metrics did not finish within a minute")


class TestConceptMetrics:
    def test_without_annotations_it_says_why(self, client, served, researcher):
        response = client.get(f"{BASE}/{served}/concept-metrics", headers=researcher)
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "unavailable" and "attributes.csv" in body["reason"]

    def test_runs_in_the_background_and_follows_edits(self, client, annotated, researcher):
        first = client.get(f"{BASE}/{annotated}/concept-metrics", headers=researcher)
        assert first.status_code in (200, 202)  # answered at once, whatever the state
        report = wait_ready(client, researcher, annotated).json()
        assert report["status"] == "ready" and report["split"] == "test" and report["n_images"] == 48
        for kind in ("object", "background"):
            assert 0.0 <= report["pointing_game"][kind] <= 1.0
        assert {"cem", "clm", "cgim", "per_concept", "iou", "mass_in_mask"} <= set(report)
        assert report["per_concept"]["water"]["kind"] == "background"
        assert report["version"] == 1
        edit = client.post(f"{BASE}/{annotated}/edits", headers=researcher,
                           json={"base_version": 1, "edits": [{"op": "prune", "concept": "feathers"}]})
        assert edit.status_code in (200, 201), edit.text
        again = client.get(f"{BASE}/{annotated}/concept-metrics", headers=researcher)
        assert again.status_code == 200  # the maps are cached: only the head's summary is redone
        after = again.json()
        assert after["version"] == 2 and after["per_concept"]["feathers"]["max_abs_weight"] == 0.0
        assert after["per_concept"]["feathers"]["n_top"] == 0

    def test_unknown_split_and_method(self, client, annotated, researcher):
        response = client.get(f"{BASE}/{annotated}/concept-metrics", headers=researcher, params={"split": "nope"})
        assert response.status_code == 422 and "nope" in response.json()["error"]["message"]
        response = client.get(f"{BASE}/{annotated}/concept-metrics", headers=researcher, params={"method": "value"})
        assert response.status_code == 422 and "valid: " in response.json()["error"]["message"]

    def test_bank_and_model_pages_show_existence_and_location(self, client, annotated, researcher, db):
        from app.models import Model

        wait_ready(client, researcher, annotated)
        name = db.get(Model, annotated).name
        bank = client.get(f"/models/{name}/bank", headers=researcher)
        assert bank.status_code == 200 and "Existence" in bank.text and "computed" not in bank.text
        table = client.get(f"/models/{name}/concepts", headers=researcher, params={"class": "bird"})
        assert table.status_code == 200 and 'class="num existence"' in table.text
        existence = [cell for cell in table.text.split('class="num existence">')[1:]]
        assert any(not cell.startswith("\u2014") for cell in existence)  # some concept has a number


class TestOverlayPage:
    def test_overlay_png_and_fragment_use_the_maps(self, client, served, researcher, image_id, db):
        from app.models import Model

        name = db.get(Model, served).name
        a = client.get(f"/models/{name}/images/overlay.png", headers=researcher,
                       params={"id": image_id, "target": "concept:water", "opacity": "0.7"})
        b = client.get(f"/models/{name}/images/overlay.png", headers=researcher,
                       params={"id": image_id, "target": "concept:grass", "opacity": "0.7"})
        assert a.status_code == b.status_code == 200 and a.headers["content-type"] == "image/png"
        assert a.headers["x-concept-maps"] == cam.DEFAULT_MAP_METHOD["vit"] and a.content != b.content
        fragment = client.get(f"/models/{name}/images/overlay", headers={**researcher, "HX-Request": "true"},
                              params={"id": image_id, "target": "class:dog", "opacity": "0.4"})
        assert fragment.status_code == 200 and 'class="chart chart-colorbar"' in fragment.text
        assert "contribution to the class logit" in fragment.text and "Map method" in fragment.text
        page = client.get(f"/models/{name}/images/view", headers=researcher, params={"id": image_id})
        assert page.status_code == 200 and "#maps-title" in page.text  # waterfall bars link to the map
        bad = client.get(f"/models/{name}/images/overlay.png", headers=researcher,
                         params={"id": "../workspace.json", "target": "concept:water"})
        assert bad.status_code in (400, 404)
