"""Image pages: the filtered grid, one image explained, files, overlays, what-ifs, uploads."""

import io
import re

import pytest
import torch
from PIL import Image
from sqlalchemy import select

from app.models import Model
from app.services import inspect
from app.templating import pct

from .helpers import text_of
from .world import CLASSES, CONCEPTS, DIM, SPLITS

HX = {"HX-Request": "true"}


def model_id(db, name):
    return db.scalar(select(Model.id).where(Model.name == name))


def thumbs(html: str) -> list[str]:
    return re.findall(r'class="thumb[^"]*"\s+href="/models/[^"]+/images/view\?id=([^"]+)"', html)


class TestGrid:
    def test_defaults_to_the_test_split_with_every_image(self, client, served, browser):
        response = client.get(f"/models/{served}/images")
        assert response.status_code == 200
        assert len(thumbs(response.text)) == SPLITS["test"] * len(CLASSES)
        assert f"{SPLITS['test'] * len(CLASSES)} images" in text_of(response.text)
        assert '<option value="test" selected>' in response.text

    def test_filters_match_the_service(self, client, ctx, db, served, browser):
        params = {"split": "test_shifted", "correct": "no", "label": "cat"}
        response = client.get(f"/models/{served}/images", params=params)
        expected = inspect.browse_images(ctx.models, model_id(db, served), split="test_shifted", correct=False,
                                         label="cat")
        assert expected["total"] > 0
        assert [i.replace("%2F", "/") for i in thumbs(response.text)] == [i["image_id"] for i in expected["items"]]
        assert f"{expected['total']} image" in text_of(response.text)

    def test_group_filter_and_fragment(self, client, served, browser):
        response = client.get(f"/models/{served}/images/grid", params={"split": "train", "group": "water"})
        assert response.status_code == 200 and "<html" not in response.text and 'id="image-grid"' in response.text
        assert all(".png" in t for t in thumbs(response.text)) and "water" in text_of(response.text)

    def test_a_page_past_the_end_is_empty_and_junk_pages_are_page_1(self, client, served, browser):
        assert "No image matches" in text_of(client.get(f"/models/{served}/images?page=9").text)
        assert client.get(f"/models/{served}/images?page=-3").status_code == 200

    def test_unknown_class_filter_is_a_422_page(self, client, served, browser):
        response = client.get(f"/models/{served}/images", params={"label": "unicorn"})
        assert response.status_code == 422 and "unknown label" in text_of(response.text)


class TestImagePage:
    def test_shows_prediction_probabilities_and_waterfall(self, client, ctx, db, served, browser):
        image_id = "test_shifted/cat_0.png"
        response = client.get(f"/models/{served}/images/view", params={"id": image_id})
        assert response.status_code == 200
        detail = inspect.image_detail(ctx.models, model_id(db, served), image_id)
        text = text_of(response.text)
        assert f"Predicted {detail['predicted']}" in text
        for item in detail["probabilities"]:
            assert f"{item['class_name']}" in text and pct(item["probability"]) in text
        assert f"Why {detail['predicted']}?" in response.text  # plots.waterfall
        top = detail["contributions"][0]["concept"]
        assert f"target=concept%3A{top}" in response.text  # a bar links to that concept's map
        assert 'id="overlay"' in response.text and 'hx-get="/models/tiny-pcbm/images/overlay"' in response.text
        assert "Concept maps are unavailable for this model" in text  # fake embeddings: no backbone

    def test_whatif_without_javascript(self, client, served, browser):
        response = client.get(f"/models/{served}/images/view",
                              params={"id": "test_shifted/cat_0.png", "concept": "water", "score": "0"})
        assert response.status_code == 200 and 'id="whatif"' in response.text and "With “water” at 0.00" in \
            text_of(response.text)

    def test_traversal_and_unknown_ids(self, client, served, browser):
        for bad in ("../../etc/passwd", "..%2F..%2Fsecret", "/etc/passwd"):
            response = client.get(f"/models/{served}/images/view", params={"id": bad})
            assert response.status_code in (400, 404) and response.headers["content-type"].startswith("text/html")
        assert client.get(f"/models/{served}/images/view", params={"id": "test/nope.png"}).status_code == 404


class TestFiles:
    def test_thumbnails_are_re_encoded_png(self, client, served, browser):
        response = client.get(f"/models/{served}/images/file", params={"id": "test/dog_1.png", "size": 96})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG") and response.headers["x-content-type-options"] == "nosniff"
        assert Image.open(io.BytesIO(response.content)).size == (24, 24)  # never enlarged

    def test_overlay_is_the_plain_image_for_now(self, client, served, browser):
        png = client.get(f"/models/{served}/images/overlay.png", params={"id": "test/dog_1.png",
                                                                         "target": "concept:water"})
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        fragment = client.get(f"/models/{served}/images/overlay",
                              params={"id": "test/dog_1.png", "target": "concept:water", "opacity": "0.3"},
                              headers=HX)
        assert 'id="overlay"' in fragment.text and "overlay.png?id=test%2Fdog_1.png&amp;target=concept%3Awater" \
            in fragment.text
        assert "Concept maps are unavailable for this model" in text_of(fragment.text)

    def test_traversal_is_refused(self, client, served, browser):
        response = client.get(f"/models/{served}/images/file", params={"id": "../world/workspace.json"})
        assert response.status_code in (400, 404) and b"{" not in response.content[:1]


class TestWhatIf:
    def test_fragment_shows_the_change(self, client, ctx, db, served, browser):
        params = {"id": "test_shifted/cat_0.png", "concept": "striped", "score": "-5"}
        response = client.get(f"/models/{served}/images/whatif", params=params, headers=HX)
        result = inspect.whatif(ctx.models, model_id(db, served), params["id"], "striped", -5.0)
        text = text_of(response.text)
        assert response.status_code == 200 and "<html" not in response.text
        assert f"“striped” at {-5:.2f}".replace("-", "\u2212") in text
        assert result["predicted_after"] in text

    def test_a_bad_score_is_explained(self, client, served, browser):
        params = {"id": "test/cat_0.png", "concept": "water", "score": "lots"}
        assert "must be a number" in client.get(f"/models/{served}/images/whatif", params=params,
                                                headers=HX).text
        assert client.get(f"/models/{served}/images/whatif", params=params).status_code == 422


class TestUpload:
    @pytest.fixture
    def fake_backbone(self, ctx, monkeypatch):
        """Uploads embed with the backbone; a fixed embedding stands in for it (it points at "cat")."""
        embedding = torch.zeros(1, DIM)
        embedding[0, CONCEPTS.index("striped")] = 2.0

        def embed(entry, image):
            return embedding

        monkeypatch.setattr(ctx.models, "embed_image", embed)

    def png(self) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (30, 20), (200, 10, 10)).save(buffer, format="PNG")
        return buffer.getvalue()

    def test_form(self, client, served, browser):
        response = client.get(f"/models/{served}/images/upload")
        assert response.status_code == 200 and 'enctype="multipart/form-data"' in response.text

    def test_explains_an_uploaded_image(self, client, served, browser, fake_backbone):
        response = client.post(f"/models/{served}/images/upload", data={"csrf_token": browser},
                               files={"image": ("mine.png", self.png(), "image/png")})
        assert response.status_code == 200
        text = text_of(response.text)
        assert "Predicted cat" in text and "30 × 20 pixels" in text and "Why cat?" in response.text

    @pytest.mark.parametrize("payload, status", [
        (b"<script>alert('pwned')</script>", 415), (b"", 400), (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400),
    ])
    def test_bad_files_are_refused_and_never_echoed(self, client, served, browser, fake_backbone, payload, status):
        response = client.post(f"/models/{served}/images/upload", data={"csrf_token": browser},
                               files={"image": ("evil.svg", payload, "image/svg+xml")})
        assert response.status_code in (status, 400, 415) and response.status_code < 500
        assert "flash-error" in response.text
        assert b"pwned" not in response.content and "evil.svg" not in response.text

    def test_needs_the_csrf_token(self, client, served, browser, fake_backbone):
        response = client.post(f"/models/{served}/images/upload",
                               files={"image": ("mine.png", self.png(), "image/png")})
        assert response.status_code == 403
