"""/api/v1/models/{id}/{concepts,matrix,preview,images,predict}: one class per endpoint.

Expected numbers are recomputed here from the workspace files with the library alone
(``load_model``, ``apply_edits``, ``decision_function``), never from the service.
"""

import io
import struct
import zlib
from contextlib import ExitStack

import pytest
import torch
from PIL import Image

from app.services import history
from app.services.workspace_import import import_workspace
from ml.editing import apply_edits
from ml.embed import EmbeddedDataset, embed_images
from ml.evaluation import classification_report
from ml.pcbm import load_model

from .history_helpers import register_model
from .workspace_helpers import CLASSES, CONCEPTS, png_bytes, tiny_backbone, tiny_workspace  # noqa: F401

BASE = "/api/v1/models"
TRAVERSALS = ["../workspace.json", "%2e%2e%2fworkspace.json", "..%252fworkspace.json", "..%2fworkspace.json",
              "test/../../workspace.json", "/etc/passwd", "..\\workspace.json"]


@pytest.fixture
def ids(db, ctx, tiny_workspace):
    return dict(zip(["pcbm", "pcbm_h"], import_workspace(db, ctx, tiny_workspace), strict=True))


@pytest.fixture
def researcher(as_role):
    return as_role("researcher")


@pytest.fixture
def data(tiny_workspace):
    return EmbeddedDataset.load(tiny_workspace / "embeddings" / "toy.safetensors")


def saved(workspace, name="pcbm"):
    return load_model(workspace / "models" / name)


def group_names(data):
    return sorted({g for g in data.groups if g is not None})


def report(model, part, data):
    groups = torch.tensor([group_names(data).index(g) for g in part.groups])
    return classification_report(model.decision_function(part.embeddings), part.labels, groups, CLASSES,
                                 group_names(data))


def assert_permissions(client, as_role, method, url, **kwargs):
    assert client.request(method, url, **kwargs).status_code == 401
    assert client.request(method, url, headers=as_role("participant"), **kwargs).status_code == 403


class TestConcepts:
    def test_weights_for_one_class_sorted_by_magnitude(self, client, ids, researcher, tiny_workspace):
        body = client.get(f"{BASE}/{ids['pcbm']}/concepts", params={"class": "bird"}, headers=researcher).json()
        weight = saved(tiny_workspace).head.weight_
        assert body["total"] == len(CONCEPTS) and body["class_name"] == "bird"
        magnitudes = [abs(row["weight"]) for row in body["concepts"]]
        assert magnitudes == sorted(magnitudes, reverse=True)
        for row in body["concepts"]:
            assert row["weight"] == pytest.approx(float(weight[0, row["index"]]))
            assert row["max_abs_weight"] == pytest.approx(float(weight[:, row["index"]].abs().max()))
        feathers = next(r for r in body["concepts"] if r["concept"] == "feathers")
        assert feathers["source"] == "cav" and feathers["quality"] == pytest.approx(0.6)

    def test_search_sort_and_every_class(self, client, ids, researcher):
        body = client.get(f"{BASE}/{ids['pcbm']}/concepts", params={"q": "S", "sort": "name", "order": "asc"},
                          headers=researcher).json()
        names = [r["concept"] for r in body["concepts"]]
        assert names == sorted(n for n in CONCEPTS if "s" in n)
        assert set(body["concepts"][0]["weights"]) == set(CLASSES) and body["concepts"][0]["weight"] is None

    def test_unknown_class_is_422_naming_it(self, client, ids, researcher):
        response = client.get(f"{BASE}/{ids['pcbm']}/concepts", params={"class": "zebra"}, headers=researcher)
        assert response.status_code == 422 and "zebra" in response.json()["error"]["message"]

    def test_unknown_model_is_404_and_an_unimported_one_409(self, client, db, ctx, researcher):
        assert client.get(f"{BASE}/999/concepts", headers=researcher).status_code == 404
        plain = register_model(db, ctx.artifacts, author=None)
        response = client.get(f"{BASE}/{plain.id}/concepts", headers=researcher)
        assert response.status_code == 409 and response.json()["error"]["code"] == "model_not_servable"

    def test_permissions(self, client, ids, as_role):
        assert_permissions(client, as_role, "GET", f"{BASE}/{ids['pcbm']}/concepts")
        assert client.get(f"{BASE}/{ids['pcbm']}/concepts", headers=as_role("admin")).status_code == 200


class TestMatrix:
    def test_classes_by_concepts(self, client, ids, researcher, tiny_workspace):
        body = client.get(f"{BASE}/{ids['pcbm']}/matrix", headers=researcher).json()
        assert body["classes"] == CLASSES and body["concepts"] == CONCEPTS
        assert torch.tensor(body["weights"]).equal(saved(tiny_workspace).head.weight_)

    def test_permissions(self, client, ids, as_role):
        assert_permissions(client, as_role, "GET", f"{BASE}/{ids['pcbm']}/matrix")


def preview(client, headers, model_id, edits, base=1):
    return client.post(f"{BASE}/{model_id}/preview", json={"base_version": base, "edits": edits}, headers=headers)


EDITS = [{"op": "prune", "concept": "feathers"}, {"op": "scale", "concept": "stripes", "class_name": "cat", "value": 0.25}]


class TestPreview:
    @pytest.mark.parametrize("name", ["pcbm", "pcbm_h"])
    def test_numbers_equal_a_full_recompute(self, client, ids, researcher, tiny_workspace, data, name):
        response = preview(client, researcher, ids[name], EDITS)
        assert response.status_code == 200
        body = response.json()
        model = saved(tiny_workspace, name)
        edited, _ = apply_edits(model, EDITS)
        assert [s["name"] for s in body["splits"]] == ["test", "train", "val"]
        for split in body["splits"]:
            part = data.split(split["name"])
            before, after = report(model, part, data), report(edited, part, data)
            assert split["n"] == len(part)
            assert split["accuracy"]["before"] == before["accuracy"] and split["accuracy"]["after"] == after["accuracy"]
            assert split["balanced_accuracy"]["after"] == after["balanced_accuracy"]
            assert split["worst_group"]["before"] == before["worst_group"]
            assert split["worst_group"]["after"] == after["worst_group"]
            assert {g["name"]: g["after"] for g in split["groups"]} == after["per_group"]
            assert {c["name"]: c["after"] for c in split["classes"]} == after["per_class"]
            old = model.decision_function(part.embeddings).argmax(1)
            new = edited.decision_function(part.embeddings).argmax(1)
            right_now, right_before = new == part.labels, old == part.labels
            assert split["n_flipped"] == int((old != new).sum())
            assert split["newly_correct"] == int((right_now & ~right_before).sum())
            assert split["newly_wrong"] == int((right_before & ~right_now).sum())
            for flip in split["flipped"]:
                row = part.image_ids.index(flip["image_id"])
                assert (flip["before"], flip["after"]) == (CLASSES[old[row]], CLASSES[new[row]])
        assert body["changed_concepts"] == ["feathers", "stripes"]

    def test_nothing_is_saved(self, client, db, ids, researcher):
        preview(client, researcher, ids["pcbm"], EDITS)
        assert len(history.list_versions(db, ids["pcbm"])) == 1

    def test_commit_after_preview_stores_the_previewed_weights_and_is_served(
            self, client, db, ctx, ids, researcher, tiny_workspace, data):
        previewed = preview(client, researcher, ids["pcbm"], EDITS).json()
        response = client.post(f"{BASE}/{ids['pcbm']}/edits", json={"base_version": 1, "edits": EDITS},
                               headers=researcher)
        assert response.status_code == 201
        edited, _ = apply_edits(saved(tiny_workspace), EDITS)
        stored = history.load_state(db, ctx.artifacts, ids["pcbm"])
        assert torch.equal(stored.tensors["weight"], edited.head.weight_)
        changes = {(c["class"], c["concept"]): c["new"] for r in previewed["records"] for c in r["changes"]}
        for (class_name, concept), value in changes.items():
            assert stored.tensors["weight"][CLASSES.index(class_name), CONCEPTS.index(concept)] == value
        version = response.json()
        test_after = next(s for s in previewed["splits"] if s["name"] == "test")["accuracy"]["after"]
        assert version["metrics"]["test"]["accuracy"] == test_after
        # the service serves the new head: the next preview's "before" is the last one's "after"
        again = preview(client, researcher, ids["pcbm"], [{"op": "prune", "concept": "sky"}], base=2).json()
        for old, new in zip(previewed["splits"], again["splits"], strict=True):
            assert new["accuracy"]["before"] == old["accuracy"]["after"]
        correct = client.get(f"{BASE}/{ids['pcbm']}/images", params={"split": "test", "correct": True},
                             headers=researcher).json()["total"]
        test = data.split("test")
        assert correct == int((edited.predict(test.embeddings) == test.labels).sum())

    def test_a_stale_base_version_is_409_with_the_current_version(self, client, ids, researcher):
        client.post(f"{BASE}/{ids['pcbm']}/edits", json={"base_version": 1, "edits": EDITS}, headers=researcher)
        response = preview(client, researcher, ids["pcbm"], EDITS, base=1)
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "version_conflict" and error["detail"]["current_version"]["number"] == 2

    def test_unknown_concept_is_422_naming_it(self, client, ids, researcher):
        response = preview(client, researcher, ids["pcbm"], [{"op": "prune", "concept": "unicorn horn"}])
        assert response.status_code == 422
        error = response.json()["error"]
        assert "unicorn horn" in error["message"] and error["detail"]["unknown_concepts"] == ["unicorn horn"]

    def test_unknown_class_and_bad_values_are_422(self, client, ids, researcher):
        bad_class = preview(client, researcher, ids["pcbm"], [{"op": "prune", "concept": "sky", "class_name": "emu"}])
        assert bad_class.status_code == 422 and "emu" in bad_class.json()["error"]["message"]
        no_value = preview(client, researcher, ids["pcbm"], [{"op": "scale", "concept": "sky"}])
        assert no_value.status_code == 422 and "value" in no_value.json()["error"]["message"]
        assert preview(client, researcher, ids["pcbm"], []).status_code == 422
        huge = preview(client, researcher, ids["pcbm"], [{"op": "set", "concept": "sky", "value": 1e30}])
        assert huge.status_code == 422 and "beyond" in huge.json()["error"]["message"]

    def test_busy_previews_get_503_with_retry_after(self, client, ctx, ids, researcher):
        limit = ctx.preview_limit
        limit.wait_s = 0.0
        with ExitStack() as stack:
            for _ in range(limit.slots):
                stack.enter_context(limit.slot())
            response = preview(client, researcher, ids["pcbm"], EDITS)
        assert response.status_code == 503 and response.headers["Retry-After"]

    def test_unknown_model_is_404(self, client, researcher):
        assert preview(client, researcher, 999, EDITS).status_code == 404

    def test_permissions(self, client, ids, as_role):
        assert_permissions(client, as_role, "POST", f"{BASE}/{ids['pcbm']}/preview",
                           json={"base_version": 1, "edits": EDITS})


class TestBrowseImages:
    def expected(self, tiny_workspace, data, split):
        part = data.split(split)
        return part, saved(tiny_workspace).predict(part.embeddings)

    @pytest.mark.parametrize("filters", [
        {}, {"label": "cat"}, {"predicted": "dog"}, {"correct": False}, {"correct": True, "group": "water"},
        {"label": "bird", "predicted": "bird", "group": "land"},
    ])
    def test_filters_return_only_matching_images_with_totals(self, client, ids, researcher, tiny_workspace, data,
                                                            filters):
        part, preds = self.expected(tiny_workspace, data, "test")
        keep = [i for i in range(len(part))
                if ("label" not in filters or CLASSES[part.labels[i]] == filters["label"])
                and ("predicted" not in filters or CLASSES[preds[i]] == filters["predicted"])
                and ("correct" not in filters or bool(preds[i] == part.labels[i]) == filters["correct"])
                and ("group" not in filters or part.groups[i] == filters["group"])]
        seen = []
        page = 1
        while True:
            body = client.get(f"{BASE}/{ids['pcbm']}/images", params={**filters, "page": page, "per_page": 7},
                              headers=researcher).json()
            assert body["split"] == "test" and body["total"] == len(keep)
            assert body["pages"] == max(1, -(-len(keep) // 7))
            seen += [item["image_id"] for item in body["items"]]
            if page >= body["pages"]:
                break
            page += 1
        assert seen == [part.image_ids[i] for i in keep]

    def test_items_carry_prediction_and_confidence(self, client, ids, researcher, tiny_workspace, data):
        body = client.get(f"{BASE}/{ids['pcbm']}/images", params={"split": "val", "per_page": 500},
                          headers=researcher).json()
        part, preds = self.expected(tiny_workspace, data, "val")
        probs = saved(tiny_workspace).predict_proba(part.embeddings)
        assert [i["predicted"] for i in body["items"]] == [CLASSES[p] for p in preds]
        assert body["items"][0]["confidence"] == pytest.approx(float(probs[0].max()))
        assert body["options"] == {"splits": ["test", "train", "val"], "classes": CLASSES, "groups": ["land", "water"]}

    def test_a_page_past_the_end_is_empty(self, client, ids, researcher):
        body = client.get(f"{BASE}/{ids['pcbm']}/images", params={"page": 99}, headers=researcher).json()
        assert body["items"] == [] and body["total"] == 48

    @pytest.mark.parametrize("params", [{"split": "holdout"}, {"label": "zebra"}, {"group": "sea"},
                                        {"per_page": 0}, {"page": 0}])
    def test_bad_filters_are_422(self, client, ids, researcher, params):
        assert client.get(f"{BASE}/{ids['pcbm']}/images", params=params, headers=researcher).status_code == 422

    def test_permissions(self, client, ids, as_role):
        assert_permissions(client, as_role, "GET", f"{BASE}/{ids['pcbm']}/images")


class TestImageDetail:
    def test_explains_the_prediction(self, client, ids, researcher, tiny_workspace, data):
        image_id = data.split("test").image_ids[3]
        body = client.get(f"{BASE}/{ids['pcbm_h']}/images/detail", params={"id": image_id}, headers=researcher).json()
        model = saved(tiny_workspace, "pcbm_h")
        row = data.image_ids.index(image_id)
        embedding = data.embeddings[row:row + 1]
        expected = model.explain(embedding)[0]
        assert body["predicted"] == expected["class_name"] and body["label"] == CLASSES[data.labels[row]]
        assert body["split"] == "test" and body["group"] == data.groups[row]
        assert body["logit"] == pytest.approx(expected["logit"], abs=1e-4)
        total = body["bias"] + body["residual"] + sum(c["contribution"] for c in body["contributions"])
        assert total == pytest.approx(body["logit"], abs=1e-4)
        assert [c["concept"] for c in body["contributions"]] == [c["concept"] for c in expected["contributions"]]
        scores = model.concept_scores(embedding)[0]
        assert [s["score"] for s in body["concept_scores"]] == pytest.approx(scores.tolist(), abs=1e-4)

    def test_another_class_can_be_explained(self, client, ids, researcher, data):
        image_id = data.image_ids[0]
        body = client.get(f"{BASE}/{ids['pcbm']}/images/detail", params={"id": image_id, "class": "cat"},
                          headers=researcher).json()
        assert body["explained_class"] == "cat"

    def test_unknown_image_is_404(self, client, ids, researcher):
        response = client.get(f"{BASE}/{ids['pcbm']}/images/detail", params={"id": "test/cat/none.png"},
                              headers=researcher)
        assert response.status_code == 404

    @pytest.mark.parametrize("image_id", TRAVERSALS)
    def test_traversal_is_refused(self, client, ids, researcher, image_id):
        response = client.get(f"{BASE}/{ids['pcbm']}/images/detail", params={"id": image_id}, headers=researcher)
        assert response.status_code in (400, 404) and '"backbone"' not in response.text

    def test_permissions(self, client, ids, as_role, data):
        assert_permissions(client, as_role, "GET", f"{BASE}/{ids['pcbm']}/images/detail?id={data.image_ids[0]}")


class TestImageFile:
    def test_serves_the_image_reencoded_as_png(self, client, ids, researcher, tiny_workspace, data):
        image_id = data.image_ids[5]
        response = client.get(f"{BASE}/{ids['pcbm']}/images/file", params={"id": image_id}, headers=researcher)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.headers["x-content-type-options"] == "nosniff"
        served = Image.open(io.BytesIO(response.content))
        original = Image.open(tiny_workspace / "data" / image_id).convert("RGB")
        assert served.format == "PNG" and served.convert("RGB").tobytes() == original.tobytes()

    def test_size_shrinks_it(self, client, ids, researcher, data):
        response = client.get(f"{BASE}/{ids['pcbm']}/images/file", params={"id": data.image_ids[0], "size": 16},
                              headers=researcher)
        assert max(Image.open(io.BytesIO(response.content)).size) <= 16

    @pytest.mark.parametrize("image_id", TRAVERSALS)
    def test_traversal_never_serves_a_file_outside(self, client, ids, researcher, image_id, tiny_workspace):
        response = client.get(f"{BASE}/{ids['pcbm']}/images/file", params={"id": image_id}, headers=researcher)
        assert response.status_code in (400, 404)
        assert (tiny_workspace / "workspace.json").read_text()[:40] not in response.text

    def test_raw_encoded_traversal_in_the_url_is_refused(self, client, ids, researcher):
        for raw in ("..%2fworkspace.json", "%2e%2e%2fworkspace.json", "..%252fworkspace.json"):
            response = client.get(f"{BASE}/{ids['pcbm']}/images/file?id={raw}", headers=researcher)
            assert response.status_code in (400, 404)

    def test_unknown_image_is_404(self, client, ids, researcher):
        response = client.get(f"{BASE}/{ids['pcbm']}/images/file", params={"id": "nope.png"}, headers=researcher)
        assert response.status_code == 404

    def test_permissions(self, client, ids, as_role, data):
        assert_permissions(client, as_role, "GET", f"{BASE}/{ids['pcbm']}/images/file?id={data.image_ids[0]}")


class TestWhatIf:
    def whatif(self, client, headers, model_id, image_id, concept, score):
        return client.post(f"{BASE}/{model_id}/images/whatif",
                           json={"id": image_id, "concept": concept, "score": score}, headers=headers)

    def test_moves_the_prediction_in_the_weights_direction(self, client, ids, researcher, tiny_workspace, data):
        head = saved(tiny_workspace).head
        bird, feathers = CLASSES.index("bird"), CONCEPTS.index("feathers")
        assert head.weight_[bird, feathers] > 0
        image_id = next(i for i, y in zip(data.image_ids, data.labels.tolist(), strict=True) if y != bird)
        current = self.whatif(client, researcher, ids["pcbm"], image_id, "feathers", 0.0).json()
        up = self.whatif(client, researcher, ids["pcbm"], image_id, "feathers", current["score_before"] + 10).json()
        down = self.whatif(client, researcher, ids["pcbm"], image_id, "feathers", current["score_before"] - 10).json()
        p_bird = {name: next(p for p in r["probabilities"] if p["class_name"] == "bird")
                  for name, r in (("up", up), ("down", down))}
        assert p_bird["up"]["after"] > p_bird["up"]["before"] > p_bird["down"]["after"]
        assert up["predicted_after"] == "bird" and up["changed"] == (up["predicted_before"] != "bird")

    def test_keeping_the_score_changes_nothing(self, client, ids, researcher, data):
        image_id = data.image_ids[0]
        first = self.whatif(client, researcher, ids["pcbm"], image_id, "sky", 0.0).json()
        same = self.whatif(client, researcher, ids["pcbm"], image_id, "sky", first["score_before"]).json()
        for row in same["probabilities"]:
            assert row["after"] == pytest.approx(row["before"], abs=1e-5)

    def test_unknown_concept_is_422_and_unknown_image_404(self, client, ids, researcher, data):
        response = self.whatif(client, researcher, ids["pcbm"], data.image_ids[0], "horn", 1.0)
        assert response.status_code == 422 and "horn" in response.json()["error"]["message"]
        assert self.whatif(client, researcher, ids["pcbm"], "x.png", "sky", 1.0).status_code == 404
        assert self.whatif(client, researcher, ids["pcbm"], "../workspace.json", "sky", 1.0).status_code in (400, 404)
        assert self.whatif(client, researcher, ids["pcbm"], data.image_ids[0], "sky", 1e9).status_code == 422

    def test_permissions(self, client, ids, as_role, data):
        assert_permissions(client, as_role, "POST", f"{BASE}/{ids['pcbm']}/images/whatif",
                           json={"id": data.image_ids[0], "concept": "sky", "score": 1.0})


def bomb_png(width=30_000, height=30_000) -> bytes:
    """A tiny PNG whose header declares a huge image."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def noisy_png(size=64) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (size, size), torch.randint(0, 256, (size * size * 3,), dtype=torch.uint8,
                                                       generator=torch.Generator().manual_seed(0)).numpy().tobytes()
                    ).save(buffer, format="PNG")
    return buffer.getvalue()


class TestPredict:
    def upload(self, client, headers, model_id, content, name="x.png", content_type="image/png", **params):
        return client.post(f"{BASE}/{model_id}/predict", files={"image": (name, content, content_type)},
                           params=params, headers=headers)

    def test_predicts_and_explains_an_upload(self, client, ctx, ids, researcher, tiny_workspace):
        content = png_bytes((40, 30), (10, 200, 30))
        response = self.upload(client, researcher, ids["pcbm_h"], content, top=3)
        assert response.status_code == 200
        body = response.json()
        model = saved(tiny_workspace, "pcbm_h")
        from ml.data import open_image

        embedding = embed_images(ctx.models.backbone(ctx.models.get(ids["pcbm_h"]).backbone_spec),
                                 [open_image(content)])
        probs = model.predict_proba(embedding)[0]
        assert body["predicted"] == CLASSES[int(probs.argmax())] and (body["width"], body["height"]) == (40, 30)
        assert body["confidence"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert len(body["contributions"]) <= 3

    @pytest.mark.parametrize("content, status", [
        (b"MARKER-this is plain text, not an image", 415),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert("MARKER")</script></svg>', 415),
        (noisy_png()[:300], 400),
        (bomb_png(), 413),
        (b"", 400),
    ], ids=["text", "svg", "truncated", "bomb", "empty"])
    def test_bad_uploads_are_4xx_and_never_echoed(self, client, ids, researcher, content, status):
        response = self.upload(client, researcher, ids["pcbm"], content)
        assert response.status_code == status
        assert "MARKER" not in response.text and "<svg" not in response.text
        if len(content) > 16:
            assert content[8:24] not in response.content  # no stretch of the uploaded bytes comes back
        assert response.json()["error"]["message"]

    def test_busy_inference_gets_503(self, client, ctx, ids, researcher):
        limit = ctx.inference_limit
        limit.wait_s = 0.0
        with ExitStack() as stack:
            for _ in range(limit.slots):
                stack.enter_context(limit.slot())
            response = self.upload(client, researcher, ids["pcbm"], png_bytes())
        assert response.status_code == 503 and response.headers["Retry-After"]

    def test_a_missing_file_field_is_422(self, client, ids, researcher):
        assert client.post(f"{BASE}/{ids['pcbm']}/predict", headers=researcher).status_code == 422

    def test_permissions(self, client, ids, as_role):
        assert_permissions(client, as_role, "POST", f"{BASE}/{ids['pcbm']}/predict",
                           files={"image": ("x.png", png_bytes(), "image/png")})
