"""The demo backbone: a few training steps, the local-dir checkpoint, and the shipped checkpoint."""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ml.demo import CHECKPOINT_DIR, default_config, generate_split
from ml.demo.train_backbone import (
    MODEL_CFG,
    TINY_MODEL_CFG,
    build_model,
    contrastive_loss,
    encode_with_dense,
    load_checkpoint,
    to_input,
    train,
)
from ml.errors import ConfigError


def test_a_few_training_steps_write_a_loadable_local_dir_checkpoint(tmp_path):
    torch.set_num_threads(1)
    summary = train(tmp_path / "ckpt", steps=4, batch_size=16, pool_size=48, model_cfg=TINY_MODEL_CFG,
                    log=lambda _: None, log_every=2)
    losses = np.array(summary["history"])
    assert losses.shape == (4, 3) and np.isfinite(losses).all()
    assert not np.allclose(losses[0], losses[-1])  # the optimiser moved the model

    model, preprocess, tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert next(model.parameters()).dtype == torch.float32  # fp16 on disk, fp32 in memory
    config = json.loads((tmp_path / "ckpt" / "open_clip_config.json").read_text())
    assert config["model_cfg"] == TINY_MODEL_CFG and config["preprocess_cfg"]["size"] == 32
    assert config["pcbm_demo_training"]["steps"] == 4
    with torch.no_grad():
        emb = model.encode_image(preprocess(Image.new("RGB", (32, 32), (200, 30, 30)))[None])
        txt = model.encode_text(tokenizer(["a red object"]))
    assert emb.shape == (1, 16) and txt.shape == (1, 16) and torch.isfinite(emb).all()


def test_training_refuses_a_biased_pretraining_world(tmp_path):
    with pytest.raises(ConfigError):
        train(tmp_path, steps=1, batch_size=4, pool_size=8, model_cfg=TINY_MODEL_CFG, world=default_config())


def test_dense_pass_matches_open_clip_and_the_maskclip_definition():
    torch.manual_seed(0)
    model = build_model(TINY_MODEL_CFG, seed=0).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats, tokens = encode_with_dense(model, x)
        assert torch.allclose(feats, model.encode_image(x), atol=1e-5)
        # MaskCLIP written out by hand: the last block's value path, ln_post, proj.
        visual = model.visual
        h = visual._embeds(x)
        for block in visual.transformer.resblocks[:-1]:
            h = block(h)
        last = visual.transformer.resblocks[-1]
        wq, wk, wv = last.attn.in_proj_weight.chunk(3)
        bv = last.attn.in_proj_bias.chunk(3)[2]
        expected = visual.ln_post(last.attn.out_proj(last.ln_1(h) @ wv.T + bv)) @ visual.proj
    assert tokens.shape == (3, 16, 16)
    assert torch.allclose(tokens, expected[:, 1:], atol=1e-5)


def test_contrastive_loss_counts_every_fitting_caption_as_positive():
    img = torch.eye(3)
    perfect = contrastive_loss(img, img, torch.tensor(20.0), torch.eye(3, dtype=torch.bool))
    shared = torch.ones(3, 3, dtype=torch.bool)  # one caption true of every image: nothing to contrast
    assert perfect < 1e-3 and contrastive_loss(img, img, torch.tensor(20.0), shared) > 0.5


def test_shipped_checkpoint_loads_small_and_embeds_a_world_image():
    weights = CHECKPOINT_DIR / "open_clip_model.safetensors"
    assert weights.stat().st_size < 10 * 2**20
    with safe_open(str(weights), framework="pt") as handle:
        assert all(handle.get_tensor(k).dtype in (torch.float16, torch.int64) for k in list(handle.keys())[:5])
    model, preprocess, tokenizer = open_clip.create_model_and_transforms(f"local-dir:{CHECKPOINT_DIR}")[0::2] + (
        open_clip.get_tokenizer(f"local-dir:{CHECKPOINT_DIR}"),)
    model = model.float().eval()
    image = generate_split(default_config(), "test", n=4).images
    with torch.no_grad():
        via_open_clip = model.encode_image(preprocess(Image.fromarray(image[0]))[None])
        via_arrays = model.encode_image(to_input(torch.from_numpy(image[:1])))
        text = model.encode_text(tokenizer(["water background"]))
    assert via_open_clip.shape == (1, MODEL_CFG["embed_dim"]) and torch.isfinite(via_open_clip).all()
    assert torch.allclose(via_open_clip, via_arrays, atol=1e-4)  # the training input matches open_clip's transform
    assert text.shape == (1, MODEL_CFG["embed_dim"]) and torch.isfinite(text).all()
