"""open_clip backbones with random weights (pretrained=None): real architectures, no downloads."""

import json
import os
import shutil

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import ml.backbone as backbone_module
from ml.backbone import (
    SPATIAL_METHODS,
    Backbone,
    BackboneSpec,
    OpenClipBackbone,
    load_backbone,
    parse_backbone_spec,
)
from ml.errors import ConfigError, DataError, ShapeError

VIT, VIT_SIZE = "ViT-S-32-alt", 96  # 3 x 3 patches: small and fast on a CPU
RN, RN_SIZE = "RN50", 64  # 2 x 2 positions after the stride-32 trunk


@pytest.fixture(scope="module")
def vit():
    return OpenClipBackbone(VIT, device="cpu", image_size=VIT_SIZE)


@pytest.fixture(scope="module")
def rn():
    return OpenClipBackbone(RN, device="cpu", image_size=RN_SIZE)


def _images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_varied(t):
    assert t.dtype == torch.float32 and t.device.type == "cpu"
    assert torch.isfinite(t).all()
    flat = t.reshape(-1, t.shape[-1])
    assert (flat - flat[0]).abs().max() > 1e-4, "every row is the same"


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def test_vit_encodes_images_and_texts(vit):
    assert isinstance(vit, Backbone)
    assert vit.embed_dim == 256 and vit.image_size == VIT_SIZE and vit.device.type == "cpu"
    assert len(vit.identity) == 64 and int(vit.identity, 16) >= 0
    images = vit.encode_images(_images(3, VIT_SIZE))
    assert images.shape == (3, 256)
    _assert_varied(images)
    texts = vit.encode_texts(["a photo of a dog", "a photo of a cat", "stripes"])
    assert texts.shape == (3, 256)
    _assert_varied(texts)
    assert vit.encode_texts([]).shape == (0, 256)
    with pytest.raises(DataError, match="list of strings"):
        vit.encode_texts("a dog")


def test_preprocess_gives_model_input(vit):
    from PIL import Image

    tensor = vit.preprocess(Image.new("L", (200, 120), 128))
    assert tensor.shape == (3, VIT_SIZE, VIT_SIZE) and tensor.dtype == torch.float32


def test_random_weights_are_seeded(vit):
    again = OpenClipBackbone(VIT, device="cpu", image_size=VIT_SIZE, seed=0)
    other = OpenClipBackbone(VIT, device="cpu", image_size=VIT_SIZE, seed=1)
    images = _images(1, VIT_SIZE)
    assert again.identity == vit.identity != other.identity
    assert torch.equal(again.encode_images(images), vit.encode_images(images))
    assert not torch.allclose(other.encode_images(images), vit.encode_images(images))


def test_vit_spatial_tokens(vit):
    images = _images(2, VIT_SIZE)
    tokens = {method: vit.spatial_tokens(images, method) for method in ("patch", "maskclip", "default")}
    for method, value in tokens.items():
        assert value.shape == (2, 3, 3, 256), method
        _assert_varied(value)
    assert torch.equal(tokens["default"], tokens["maskclip"])
    assert not torch.allclose(tokens["patch"], tokens["maskclip"])


def test_vit_patch_tokens_agree_with_open_clip_and_the_class_token(vit):
    images = _images(2, VIT_SIZE)
    visual = vit.model.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            pooled, tokens = visual(images)  # open_clip: tokens are ln_post'ed, not projected
            trunk = visual.transformer(visual._embeds(images))
            class_token = visual.ln_post(trunk[:, 0]) @ visual.proj
    finally:
        visual.output_tokens = False
    torch.testing.assert_close(class_token, vit.encode_images(images), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pooled, vit.encode_images(images), rtol=1e-4, atol=1e-5)
    expected = (tokens @ visual.proj).reshape(2, 3, 3, -1)
    torch.testing.assert_close(vit.spatial_tokens(images, "patch"), expected, rtol=1e-4, atol=1e-5)


def test_maskclip_is_the_value_path_of_the_last_block(vit):
    images = _images(2, VIT_SIZE)
    visual = vit.model.visual
    last = visual.transformer.resblocks[-1]
    captured = {}
    handle = last.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0].clone()))
    try:
        with torch.no_grad():
            visual(images)
    finally:
        handle.remove()
    with torch.no_grad():
        y = last.ln_1(captured["x"])
        wq, wk, wv = last.attn.in_proj_weight.chunk(3)
        bq, bk, bv = last.attn.in_proj_bias.chunk(3)
        out = last.attn.out_proj(F.linear(y, wv, bv))
        expected = (visual.ln_post(out[:, 1:]) @ visual.proj).reshape(2, 3, 3, -1)
    torch.testing.assert_close(vit.spatial_tokens(images, "maskclip"), expected, rtol=1e-4, atol=1e-5)


def test_resnet_encodes_and_spatial_value_tokens(rn):
    assert rn.embed_dim == 1024 and rn.image_size == RN_SIZE
    images = _images(2, RN_SIZE)
    embedded = rn.encode_images(images)
    assert embedded.shape == (2, 1024)
    _assert_varied(embedded)
    texts = rn.encode_texts(["a red square", "a blue circle"])
    assert texts.shape == (2, 1024)
    _assert_varied(texts)
    assert backbone_module.DEFAULT_SPATIAL_METHOD["resnet"] == "value"
    tokens = rn.spatial_tokens(images)
    assert tokens.shape == (2, 2, 2, 1024)
    _assert_varied(tokens)


def test_spatial_method_errors(vit, rn):
    with pytest.raises(ConfigError, match="valid: clearclip, csa, kk, maskclip, patch, sclip"):
        vit.spatial_tokens(_images(1, VIT_SIZE), "gradcam")
    with pytest.raises(ConfigError, match="valid: value"):
        rn.spatial_tokens(_images(1, RN_SIZE), "maskclip")
    with pytest.raises(ShapeError, match=f"\\(N, 3, {VIT_SIZE}, {VIT_SIZE}\\)"):
        vit.encode_images(torch.zeros(1, 3, 32, 32))
    assert {"patch", "maskclip", "value"} <= set(SPATIAL_METHODS)


def test_identity_follows_the_checkpoint_bytes(vit, tmp_path):
    path = tmp_path / "weights.safetensors"
    state = _state(vit.model)
    save_file(state, str(path))
    loaded = OpenClipBackbone(VIT, pretrained=str(path), device="cpu", image_size=VIT_SIZE)
    images = _images(2, VIT_SIZE)
    torch.testing.assert_close(loaded.encode_images(images), vit.encode_images(images))
    assert loaded.identity != vit.identity
    state["visual.proj"][0, 0] += 1.0
    save_file(state, str(path))  # same path, one number changed
    changed = OpenClipBackbone(VIT, pretrained=str(path), device="cpu", image_size=VIT_SIZE)
    assert changed.identity != loaded.identity
    assert not torch.allclose(changed.encode_images(images), loaded.encode_images(images))


TINY = {  # any open_clip config works in a local dir, like the shipped demo backbone
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_local_dir_round_trip(tmp_path):
    torch.manual_seed(3)
    reference = open_clip.CLIP(**TINY).eval()
    folder = tmp_path / "model"
    folder.mkdir()
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY, "preprocess_cfg": preprocess}))
    save_file(_state(reference), str(folder / "open_clip_model.safetensors"))
    loaded = load_backbone(f"open_clip:local-dir:{folder}", device="cpu")
    assert loaded.embed_dim == 32 and loaded.image_size == 64
    images = _images(2, 64)
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(["a dog"])
    assert tokens.shape == (1, 16)  # the folder's context length, not CLIP's 77
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(images), reference.encode_image(images))
        torch.testing.assert_close(loaded.encode_texts(["a dog"]), reference.encode_text(tokens))
    assert loaded.transform.transforms[-1].mean == [0.5, 0.5, 0.5]  # the folder's preprocessing is used
    assert loaded.spatial_tokens(images).shape == (2, 4, 4, 32)
    loaded.batch_size = 1  # batching must not change results
    torch.testing.assert_close(loaded.encode_images(images), reference.encode_image(images))
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)  # identity is content, not location
    assert load_backbone(f"open_clip:local-dir:{moved}", device="cpu").identity == loaded.identity


def test_parse_backbone_spec():
    assert parse_backbone_spec("open_clip:ViT-B-32") == BackboneSpec("ViT-B-32", None)
    assert parse_backbone_spec(" open_clip:RN50@openai ") == BackboneSpec("RN50", "openai")
    spec = parse_backbone_spec("open_clip:ViT-B-32@/models/vit@b32.safetensors")
    assert spec == BackboneSpec("ViT-B-32", "/models/vit@b32.safetensors")
    assert str(spec) == "open_clip:ViT-B-32@/models/vit@b32.safetensors"
    assert parse_backbone_spec("open_clip:local-dir:/models/demo") == BackboneSpec("local-dir:/models/demo")
    demo = parse_backbone_spec("demo")
    assert demo.model_name.startswith("local-dir:") and demo.model_name.endswith(os.path.join("demo", "checkpoint"))


@pytest.mark.parametrize("bad, message", [
    ("", "bad backbone spec"), ("clip:ViT-B-32", "open_clip:NAME"), ("open_clip:", "bad backbone spec"),
    ("open_clip:ViT-B-32@", "bad backbone spec"), ("open_clip:local-dir:", "needs a directory"),
    ("open_clip:hf-hub:org/repo", "network"), ("open_clip:ViT-B-23", "did you mean.*ViT-B-32"),
])
def test_parse_backbone_spec_errors(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_backbone_spec(bad)


def test_load_backbone_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="missing.safetensors"):
        load_backbone(f"open_clip:{VIT}@{tmp_path}/missing.safetensors")
    with pytest.raises(ConfigError, match="unknown open_clip model 'RN5O'"):
        OpenClipBackbone("RN5O")
    with pytest.raises(ConfigError, match="known tags"):
        load_backbone("open_clip:RN50@no-such-tag")
    monkeypatch.setattr(backbone_module, "DEMO_DIR", tmp_path / "no-demo")
    with pytest.raises(DataError, match="demo backbone is missing"):
        load_backbone("demo")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "open_clip_config.json").write_text("{}")
    with pytest.raises(DataError, match="open_clip_model.safetensors"):
        load_backbone(f"open_clip:local-dir:{tmp_path / 'half'}")
    (tmp_path / "half" / "open_clip_model.safetensors").write_bytes(b"")
    with pytest.raises(DataError, match="not an open_clip config"):
        load_backbone(f"open_clip:local-dir:{tmp_path / 'half'}")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"visual.proj": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(DataError, match=f"cannot load weights for {VIT}"):
        OpenClipBackbone(VIT, pretrained=str(wrong), device="cpu", image_size=VIT_SIZE)


def test_uncached_tag_is_refused_without_network(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HOME", str(tmp_path))  # an empty ~/.cache/clip
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda **kwargs: None)
    with pytest.raises(DataError, match="RN50@openai are not cached"):
        load_backbone("open_clip:RN50@openai")
    assert os.environ.get("HF_HUB_OFFLINE")


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_pickled_checkpoints_are_refused_before_loading(tmp_path, suffix):
    """A pickle-format checkpoint could run code when loaded; only safetensors is accepted."""
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / f"weights{suffix}"
    checkpoint.write_bytes(b"not even read")
    with pytest.raises(DataError, match="safetensors"):
        load_backbone(f"open_clip:ViT-S-32-alt@{checkpoint}")
    assert not marker.exists()
