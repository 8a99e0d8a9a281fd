"""Train the small CLIP backbone shipped with the demo, on the UNBIASED pretraining world.

    python -m ml.demo.train_backbone --out DIR --steps 700 --seed 0

The model is an open_clip ``CLIP`` built from our own config (a 64px ViT with 8px
patches and a narrow text tower, so the 49,408-token embedding table stays small).
Three objectives:

* the CLIP contrastive loss over (image, caption) pairs, with every caption that fits
  an image counted as a positive (partial captions such as "a red object" fit many
  images, and calling those negatives would teach the towers to ignore the words);
* a local alignment loss on the "maskclip" dense tokens (see :func:`encode_with_dense`):
  each patch token's cosine-softmax over the concept vocabulary's text embeddings is
  pulled towards the concepts present at that patch (the object's concepts on object
  patches, the background concept elsewhere). Without it, patch tokens do not localise
  concepts on a small ViT, and concept maps point at the wrong region;
* a smaller per-group concept contrast on the pooled embedding (:func:`group_loss`).

The patch embedding starts from PCA-whitened patches (:func:`pca_patch_init`).

Loss = clip + 0.5 * dense + 0.5 * group; the CLIP loss stays the main objective.

The checkpoint is written in open_clip's local-dir format, weights in fp16.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ml.demo.captions import make_caption
from ml.demo.world import GROUPS, WorldConfig, concept_vocabulary, generate_split, pretrain_config
from ml.errors import ConfigError

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32, "mlp_ratio": 4.0,
                   "pos_embed_type": "sin_cos_2d"},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
TINY_MODEL_CFG = {  # for tests: same structure, a fraction of the compute
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}
MEAN = (0.49, 0.56, 0.49)  # pixel statistics of the pretraining world, rounded
STD = (0.31, 0.23, 0.30)
DENSE_SCALE = 10.0  # inverse temperature of the per-patch softmax over concepts


def preprocess_cfg(image_size: int) -> dict:
    return {"size": image_size, "mode": "RGB", "mean": list(MEAN), "std": list(STD),
            "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) float, exactly what the open_clip transform gives."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def encode_with_dense(model: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled image features and "maskclip" patch tokens in one pass.

    With X the input to the last residual block: Y = ln_1(X), V = Y Wv^T + bv (the value
    slice of attn.in_proj), O = attn.out_proj(V), T = ln_post(O) @ proj; patch tokens only.
    Returns ``(features (N, d), tokens (N, h*w, d))``, both unnormalised.
    """
    visual = model.visual
    x = visual._embeds(images)  # noqa: SLF001 - open_clip has no public name for it
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    last = blocks[-1]
    pooled, _ = visual._pool(last(x))  # noqa: SLF001 - as above
    features = pooled @ visual.proj
    width = x.shape[-1]
    attn = last.attn
    values = F.linear(last.ln_1(x), attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
    tokens = visual.ln_post(attn.out_proj(values)) @ visual.proj
    return features, tokens[:, 1:]


def build_model(model_cfg: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return open_clip.model.CLIP(**json.loads(json.dumps(model_cfg)))


@torch.no_grad()
def pca_patch_init(model: torch.nn.Module, images_uint8: torch.Tensor) -> None:
    """Start the patch embedding as PCA-whitened image patches of the training data.

    A ViT from scratch learns colour and ground in a few dozen steps but object outlines
    only after many thousands of images; a whitened patch basis (edges and colour
    opponents at equal variance, the classic data-dependent init) shortens that a lot.
    """
    conv = model.visual.conv1
    out_ch, in_ch, ph, pw = conv.weight.shape
    x = to_input(images_uint8)
    patches = x.unfold(2, ph, ph).unfold(3, pw, pw).permute(0, 2, 3, 1, 4, 5).reshape(-1, in_ch * ph * pw)
    patches = patches - patches.mean(0)
    eigval, eigvec = torch.linalg.eigh(patches.T @ patches / len(patches))
    keep = min(out_ch, eigval.numel())
    eigval, eigvec = eigval.flip(0)[:keep], eigvec.flip(1)[:, :keep]
    weight = torch.zeros(out_ch, in_ch * ph * pw)
    weight[:keep] = (eigvec / torch.sqrt(eigval + 0.1 * eigval.mean())).T
    conv.weight.copy_(weight.reshape(conv.weight.shape))


def _patch_fractions(masks: np.ndarray, patch: int) -> np.ndarray:
    n, h, w = masks.shape
    return masks.reshape(n, h // patch, patch, w // patch, patch).mean(axis=(2, 4)).reshape(n, -1).astype(np.float32)


class CaptionBatcher:
    """Fresh captions for each draw of an image, tokenised with a cache (captions repeat a lot)."""

    def __init__(self, config: WorldConfig, tokenizer, seed: int, drop: float = 0.3):
        self.config, self.tokenizer, self.drop = config, tokenizer, drop
        self.rng = np.random.default_rng([seed, 7])
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, attributes: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        texts, mentions = [], np.zeros((len(attributes), len(GROUPS)), dtype=bool)
        for i, row in enumerate(attributes):
            values = {g: self.config.values(g)[int(row[j])] for j, g in enumerate(GROUPS)}
            text, said = make_caption(values, self.rng, drop=self.drop)
            texts.append(text)
            mentions[i] = [said[g] for g in GROUPS]
        missing = sorted({t for t in texts if t not in self.cache})
        if missing:
            for t, tok in zip(missing, self.tokenizer(missing), strict=False):
                self.cache[t] = tok
        return torch.stack([self.cache[t] for t in texts]), mentions


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, fits: torch.Tensor) -> torch.Tensor:
    """CLIP loss with multi-positive targets: ``fits[i, j]`` says caption j is true of image i."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = fits.float()
    i2t = -(target / target.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    t2i = -(target / target.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (i2t + t2i) / 2


def dense_loss(tokens: torch.Tensor, concept_txt: torch.Tensor, obj_frac: torch.Tensor,
               obj_target: torch.Tensor, bg_target: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of each patch's softmax over concepts against what lies in the patch."""
    logits = DENSE_SCALE * F.normalize(tokens, dim=-1) @ F.normalize(concept_txt, dim=-1).T  # (N, P, C)
    target = obj_frac[..., None] * obj_target[:, None, :] + (1 - obj_frac[..., None]) * bg_target[:, None, :]
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def group_loss(features: torch.Tensor, concept_txt: torch.Tensor, attributes: torch.Tensor,
               slices: list[slice]) -> torch.Tensor:
    """Per attribute group, the image against that group's one-concept captions ("a striped object" vs
    "a dotted object" ...): a contrast with the hardest negatives, which teaches shape, pattern and size
    much sooner than random in-batch captions do (those are first told apart by colour and ground)."""
    feats = F.normalize(features, dim=-1)
    losses = torch.stack([F.cross_entropy(DENSE_SCALE * feats @ F.normalize(concept_txt[sl], dim=-1).T,
                                          attributes[:, g]) for g, sl in enumerate(slices)])
    # Each group weighs by its share of the (detached) loss: the group the model tells apart
    # worst (shape, for a small ViT) gets most of the gradient instead of a fifth of it.
    weights = losses.detach() / losses.detach().mean().clamp_min(1e-6)
    return (weights * losses).mean()


def train(out_dir: str | Path, steps: int = 700, seed: int = 0, batch_size: int = 256, lr: float = 1e-3,
          pool_size: int = 40000, dense_weight: float = 0.5, group_weight: float = 0.5,
          model_cfg: dict | None = None, world: WorldConfig | None = None, log_every: int = 25,
          save_every: int = 0, init: str | Path | None = None, log=print) -> dict:
    """Train and save a local-dir checkpoint in ``out_dir``; returns a summary with the loss history."""
    if steps < 1 or batch_size < 2 or pool_size < batch_size:
        raise ConfigError("need steps >= 1, batch_size >= 2 and pool_size >= batch_size")
    model_cfg = model_cfg or MODEL_CFG
    size, patch = model_cfg["vision_cfg"]["image_size"], model_cfg["vision_cfg"]["patch_size"]
    world = (world or pretrain_config(seed=1000 + seed)).replace(image_size=size)
    if world.pairing is not None:
        raise ConfigError("pretrain on a world whose background is independent of shape (pairing=None)")
    started = time.time()
    data = generate_split(world, "train", n=pool_size)
    images = torch.from_numpy(data.images)
    obj_frac = torch.from_numpy(_patch_fractions(data.masks, patch))
    presence = torch.from_numpy(data.presence(world)).float()
    concepts = concept_vocabulary(world)
    is_obj = torch.tensor([c.kind == "object" for c in concepts])
    bounds = np.cumsum([0] + [len(world.values(g)) for g in GROUPS])
    group_slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=False)]
    obj_target = presence * is_obj
    obj_target = obj_target / obj_target.sum(1, keepdim=True)
    bg_target = presence * ~is_obj
    log(f"rendered {pool_size} pretraining images in {time.time() - started:.0f}s")

    model = build_model(model_cfg, seed)
    if init is not None:  # continue from an earlier run (a fresh optimiser and schedule)
        state = load_file(str(Path(init) / "open_clip_model.safetensors"))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    else:
        pca_patch_init(model, images[: min(2000, pool_size)])
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    captions = CaptionBatcher(world, tokenizer, seed)
    phrase_tokens = [tokenizer(list(c.phrases)) for c in concepts]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng([seed, 11])
    history = []
    model.train()
    for step in range(1, steps + 1):
        idx = torch.from_numpy(rng.choice(pool_size, batch_size, replace=False))
        x, frac = to_input(images[idx]), obj_frac[idx]
        if rng.random() < 0.5:  # a mirrored scene keeps every concept; flip the patch labels with it
            grid = size // patch
            x = x.flip(-1)
            frac = frac.view(-1, grid, grid).flip(-1).reshape(len(idx), -1)
        attrs = data.attributes[idx.numpy()]
        text, said = captions(attrs)
        same = attrs[:, None, :] == attrs[None, :, :]                       # [image i, caption j, group]
        fits = torch.from_numpy(np.all(same | ~said[None, :, :], axis=-1))
        feats, tokens = encode_with_dense(model, x)
        txt = model.encode_text(text)
        clip = contrastive_loss(feats, txt, model.logit_scale.exp(), fits)
        choice = [int(rng.integers(len(t))) for t in phrase_tokens]
        concept_txt = model.encode_text(torch.stack([t[k] for t, k in zip(phrase_tokens, choice, strict=False)]))
        dense = dense_loss(tokens, concept_txt, frac, obj_target[idx], bg_target[idx])
        group = group_loss(feats, concept_txt, torch.from_numpy(attrs), group_slices)
        loss = clip + dense_weight * dense + group_weight * group
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        history.append((clip.item(), dense.item(), group.item()))
        if step % log_every == 0 or step == steps:
            recent = np.mean(history[-log_every:], axis=0)
            log(f"step {step}/{steps} clip {recent[0]:.3f} dense {recent[1]:.3f} group {recent[2]:.3f} "
                f"scale {model.logit_scale.exp().item():.1f} {time.time() - started:.0f}s")
        if save_every and step % save_every == 0 and step < steps:
            save_checkpoint(model, Path(out_dir) / f"step{step}", model_cfg, {"steps": step, "seed": seed})
    wall = time.time() - started
    meta = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "pool_size": pool_size,
            "dense_weight": dense_weight, "group_weight": group_weight, "init": None if init is None else str(init), "wall_seconds": round(wall, 1), "pretrain_world": world.to_dict(),
            "final_clip_loss": float(np.mean([h[0] for h in history[-log_every:]])),
            "final_dense_loss": float(np.mean([h[1] for h in history[-log_every:]])),
            "final_group_loss": float(np.mean([h[2] for h in history[-log_every:]]))}
    save_checkpoint(model, out_dir, model_cfg, meta)
    return {**meta, "history": history}


def save_checkpoint(model: torch.nn.Module, out_dir: str | Path, model_cfg: dict, meta: dict | None = None) -> Path:
    """open_clip local-dir format: open_clip_config.json + open_clip_model.safetensors (fp16)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"), metadata={"format": "pt"})
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(model_cfg["vision_cfg"]["image_size"])}
    if meta is not None:
        config["pcbm_demo_training"] = meta
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, object, object]:
    """(model in eval mode, fp32 on CPU; preprocess; tokenizer) through open_clip's own local-dir loader."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    return model.float().eval(), preprocess, tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--pool-size", type=int, default=40000)
    parser.add_argument("--dense-weight", type=float, default=0.5)
    parser.add_argument("--group-weight", type=float, default=0.5)
    parser.add_argument("--save-every", type=int, default=0, help="also save step<N>/ checkpoints")
    parser.add_argument("--init", default=None, help="continue from this checkpoint directory")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train(args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                    pool_size=args.pool_size, dense_weight=args.dense_weight,
                    group_weight=args.group_weight, save_every=args.save_every, init=args.init, log=lambda m: print(m, flush=True))
    model, _, _ = load_checkpoint(args.out)
    print(f"saved and reloaded {args.out} ({sum(p.numel() for p in model.parameters())} parameters, "
          f"{summary['wall_seconds']:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
