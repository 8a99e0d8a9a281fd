"""Concept activation maps: shapes, the mean-vs-score relation, contrasts, caching, real towers."""

import json

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ml import cam
from ml.backbone import SPATIAL_METHODS, Backbone, OpenClipBackbone, register_spatial_method
from ml.concept_metrics import pearson
from ml.concepts import ConceptBank
from ml.errors import ConfigError, ShapeError
from ml.head import SparseLinearHead

TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}
TINY_RN = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


def _local_dir(folder, config):
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = open_clip.CLIP(**config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    return OpenClipBackbone(f"local-dir:{folder}", device="cpu")


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return _local_dir(tmp_path_factory.mktemp("vit") / "m", TINY_VIT)


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    return _local_dir(tmp_path_factory.mktemp("rn") / "m", TINY_RN)


def _bank(dim, n=3, seed=0, intercepts=True):
    g = torch.Generator().manual_seed(seed)
    return ConceptBank([f"c{i}" for i in range(n)], torch.randn(n, dim, generator=g),
                       torch.randn(n, generator=g) if intercepts else None)


class MeanPooled:
    """A toy backbone whose pooled embedding is exactly the mean of its spatial tokens."""

    identity = "toy-mean-pooled"
    embed_dim = 5
    image_size = 16
    device = torch.device("cpu")
    architecture = "toy"

    def __init__(self):
        self.conv = torch.nn.Conv2d(3, self.embed_dim, kernel_size=4, stride=4)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(3))

    def preprocess(self, image):
        pixels = torch.frombuffer(bytearray(image.convert("RGB").resize((16, 16)).tobytes()), dtype=torch.uint8)
        return pixels.reshape(16, 16, 3).permute(2, 0, 1).float() / 255

    def spatial_tokens(self, images, method="default"):
        with torch.no_grad():
            return self.conv(images).permute(0, 2, 3, 1)  # (N, 4, 4, d)

    def encode_images(self, images):
        return self.spatial_tokens(images).mean(dim=(1, 2))

    def encode_texts(self, texts):
        raise NotImplementedError


@pytest.fixture(scope="module")
def toy():
    register_spatial_method("toy-tokens", ("toy",), "the toy's own tokens")(lambda visual, images: images)
    cam.DEFAULT_MAP_METHOD.setdefault("toy", "toy-tokens")
    yield MeanPooled()
    SPATIAL_METHODS.pop("toy-tokens", None)
    cam.DEFAULT_MAP_METHOD.pop("toy", None)


def test_spatial_mean_of_a_map_is_the_concept_score_when_pooling_is_a_mean(toy):
    assert isinstance(toy, Backbone)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    bank = _bank(toy.embed_dim, n=6)
    grid = cam.maps_from_tokens(toy.spatial_tokens(images), bank, cam.parse_method("toy-tokens", "toy"))
    assert grid.shape == (4, 6, 4, 4)
    scores = bank.project(toy.encode_images(images))
    torch.testing.assert_close(grid.mean(dim=(2, 3)), scores, rtol=1e-5, atol=1e-5)
    # upsampled to the input size, bilinearly: the mean moves only at the borders
    full = cam.concept_maps(toy, images, bank)
    assert full.shape == (4, 6, 16, 16)
    assert pearson(full.mean(dim=(2, 3)), scores) > 0.99

    # a class map is in logit units: its spatial mean plus the bias is the class logit
    head = SparseLinearHead(lam=1e-3, max_iter=300).fit(scores, torch.tensor([0, 1, 0, 1]))
    classes = cam.class_maps(grid, head)
    assert classes.shape == (4, 2, 4, 4)
    torch.testing.assert_close(classes.mean(dim=(2, 3)) + head.bias_, head.decision_function(scores),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cam.class_maps(grid, head, [1])[:, 0], classes[:, 1])


def test_contrasts_are_per_token_and_ignore_intercepts(toy):
    tokens = torch.randn(2, 3, 3, toy.embed_dim, generator=torch.Generator().manual_seed(1))
    bank = _bank(toy.embed_dim, n=4)
    contrast = cam.contrast_maps(tokens, bank, "contrast")
    torch.testing.assert_close(contrast.sum(1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    softmax = cam.contrast_maps(tokens, bank, "softmax")
    torch.testing.assert_close(softmax.sum(1), torch.ones(2, 3, 3))
    shifted = ConceptBank(bank.names, bank.vectors, bank.intercepts + 5.0)
    torch.testing.assert_close(cam.contrast_maps(tokens, shifted, "contrast"), contrast)
    # scaling a token does not change its contrast (cosines), but does change the raw map
    scaled = tokens.clone()
    scaled[0, 0, 0] *= 7
    torch.testing.assert_close(cam.contrast_maps(scaled, bank, "softmax"), softmax)
    with pytest.raises(ConfigError):
        cam.contrast_maps(tokens, bank, "sharpen")
    with pytest.raises(ShapeError):
        cam.score_maps(tokens[..., :2], bank)


def test_methods_resolve_by_architecture():
    assert cam.parse_method(None, "resnet") == cam.MapMethod("value", "value", None)
    default = cam.parse_method("default", "vit")
    assert default.name == cam.DEFAULT_MAP_METHOD["vit"]
    assert {"patch", "maskclip", "clearclip", "kk", "csa", "sclip", "maskclip+contrast"} <= set(cam.map_methods("vit"))
    with pytest.raises(ConfigError, match="valid: "):
        cam.parse_method("value", "vit")
    with pytest.raises(ConfigError):
        cam.parse_method("maskclip+blur", "vit")


def test_every_vit_method_gives_finite_maps_of_the_input_size(vit):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bank = _bank(vit.embed_dim)
    for method in cam.map_methods("vit"):
        maps = cam.concept_maps(vit, images, bank, method)
        assert maps.shape == (2, 3, 32, 32), method
        assert torch.isfinite(maps).all(), method
    tokens = vit.spatial_tokens(images, "clearclip")
    assert tokens.shape == (2, 4, 4, vit.embed_dim)
    assert not torch.allclose(tokens, vit.spatial_tokens(images, "maskclip"))


def test_vit_map_mean_against_the_class_token_score_is_measured_not_assumed(vit):
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    bank = _bank(vit.embed_dim, n=4, intercepts=False)
    grid = cam.score_maps(vit.spatial_tokens(images, "patch"), bank)
    scores = bank.project(vit.encode_images(images))
    r = pearson(grid.mean(dim=(2, 3)), scores)
    assert r is not None and -1.0 <= r <= 1.0  # docs/concept-maps.md reports it on the demo backbone
    assert not torch.allclose(grid.mean(dim=(2, 3)), scores, atol=1e-3)  # not exact for a class token


def test_one_map_on_a_random_resnet(resnet):
    assert resnet.architecture == "resnet"
    image = Image.new("RGB", (80, 64), (30, 160, 40))
    maps = cam.concept_maps(resnet, [image], _bank(resnet.embed_dim, n=2))
    assert maps.shape == (1, 2, 64, 64) and torch.isfinite(maps).all()
    assert maps.std() > 0


def test_one_map_on_a_random_vit_from_pil_images_with_a_token_cache(vit):
    cache = cam.TokenCache()
    images = [Image.new("RGB", (40, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (40, 40, 200))]
    bank = _bank(vit.embed_dim)
    first = cam.concept_maps(vit, images, bank, "maskclip", cache=cache)
    assert first.shape == (2, 3, 32, 32) and torch.isfinite(first).all()
    assert cache.misses == 2 and cache.hits == 0
    again = cam.concept_maps(vit, images, bank, "maskclip+softmax", size=64, cache=cache)
    assert cache.hits == 2 and again.shape == (2, 3, 64, 64)
    torch.testing.assert_close(cam.concept_maps(vit, images[:1], bank, "maskclip"), first[:1])


def test_token_cache_stays_under_its_budget():
    cache = cam.TokenCache(max_bytes=3 * 400)
    for i in range(5):
        cache.put(("k", i), torch.zeros(100))
    assert cache.get(("k", 0)) is None and cache.get(("k", 4)) is not None


def test_input_view_is_the_centre_square_the_model_sees():
    image = Image.new("RGB", (90, 30), (0, 0, 0))
    image.paste((255, 255, 255), (30, 0, 60, 30))  # a white middle third
    view = cam.input_view(image, 16)
    assert view.size == (16, 16)
    assert view.convert("L").getextrema()[0] > 200  # only the centre square is kept
    assert cam.image_digest(image) != cam.image_digest(view)
