"""Concept activation maps: where in an image each concept of a bank fires.

The map of concept i applies the concept score to every spatial token of the backbone,
``M_i(h, w) = (c_i . E(h, w) + b_i) / ||c_i||`` (science notes, section 2), and is
upsampled bilinearly to the model's input size. A *map method* names where the tokens
come from and how they are compared with the bank:

``"<tokens>"``            raw score maps on the tokens of a spatial method of
                          :data:`ml.backbone.SPATIAL_METHODS` ("patch", "maskclip",
                          "clearclip", "kk", "csa", "sclip" for ViTs; "value" for ResNets)
``"<tokens>+contrast"``   per-token contrast: the cosine of each token with concept i minus
                          the token's mean cosine over the bank's concepts
``"<tokens>+softmax"``    per-token softmax over the bank's concepts of ``tau * cosine``

A class map is ``sum_i W[k, i] * (M_i - mean_i) / scale_i`` on the raw maps, with the head's
own standardisation, so it is in logit units: for a backbone whose pooled embedding is the
mean of its tokens, its spatial mean plus the bias is the class logit.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

import ml.backbone as backbone_module
from ml.errors import ConfigError, ShapeError

CONTRASTS = ("contrast", "softmax")
# Chosen by measurement on the demo world (docs/concept-maps.md): every method is training-free.
DEFAULT_MAP_METHOD: dict[str, str] = {"vit": "maskclip+softmax", "resnet": "value", "other": "default"}
DEFAULT_TEMPERATURE = 10.0  # tau of "+softmax"; a token's cosines span ~0.1-0.5, so 10 keeps it soft


@dataclass(frozen=True)
class MapMethod:
    name: str  # as given after defaults are resolved, e.g. "maskclip+softmax"
    tokens: str  # a key of ml.backbone.SPATIAL_METHODS
    contrast: str | None  # None | "contrast" | "softmax"


def architecture(backbone) -> str:
    return getattr(backbone, "architecture", "other")


def map_methods(arch: str) -> list[str]:
    """Every map method valid for an architecture ("vit", "resnet", ...)."""
    tokens = sorted(k for k, m in backbone_module.SPATIAL_METHODS.items() if arch in m.architectures)
    return [t + suffix for t in tokens for suffix in ("", *(f"+{c}" for c in CONTRASTS))]


def parse_method(method: str | None, arch: str) -> MapMethod:
    """Resolve "default" (or None) and check the method fits the architecture."""
    name = DEFAULT_MAP_METHOD.get(arch, "default") if method in (None, "", "default") else str(method)
    tokens, _, contrast = name.partition("+")
    if tokens == "default":
        tokens = backbone_module.DEFAULT_SPATIAL_METHOD.get(arch, "")
    spec = backbone_module.SPATIAL_METHODS.get(tokens)
    if spec is None or arch not in spec.architectures or (contrast and contrast not in CONTRASTS):
        valid = ", ".join(map_methods(arch)) or "none"
        raise ConfigError(f"unknown concept-map method {method!r} for a {arch} backbone; valid: {valid}")
    return MapMethod(tokens + (f"+{contrast}" if contrast else ""), tokens, contrast or None)


# ---------------------------------------------------------------------------- maps from tokens
def score_maps(tokens: torch.Tensor, bank) -> torch.Tensor:
    """Raw concept maps ``(E(h, w) . c_i + b_i) / ||c_i||``: (N, h, w, d) -> (N, C, h, w)."""
    if tokens.ndim != 4 or tokens.shape[-1] != bank.dim:
        raise ShapeError(f"spatial tokens must be (N, h, w, {bank.dim}), got {tuple(tokens.shape)}")
    n, h, w, d = tokens.shape
    scores = bank.project(tokens.reshape(-1, d).float())  # (N*h*w, C)
    return scores.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


def contrast_maps(tokens: torch.Tensor, bank, contrast: str, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """Per-token contrast over the bank's concepts (cosines; intercepts only shift a whole map)."""
    n, h, w, d = tokens.shape
    unit = F.normalize(tokens.reshape(-1, d).float(), dim=1)
    cosines = unit @ F.normalize(bank.vectors, dim=1).T  # (N*h*w, C)
    if contrast == "contrast":
        values = cosines - cosines.mean(dim=1, keepdim=True)
    elif contrast == "softmax":
        values = torch.softmax(float(temperature) * cosines, dim=1)
    else:
        raise ConfigError(f"unknown contrast {contrast!r}; choose one of {', '.join(CONTRASTS)}")
    return values.reshape(n, h, w, -1).permute(0, 3, 1, 2).contiguous()


def maps_from_tokens(tokens: torch.Tensor, bank, method: MapMethod,
                     temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """The method's concept maps at token resolution, (N, C, h, w)."""
    if method.contrast is None:
        return score_maps(tokens, bank)
    return contrast_maps(tokens, bank, method.contrast, temperature)


def class_maps(raw_maps: torch.Tensor, head, classes: Sequence[int] | None = None) -> torch.Tensor:
    """Class maps (N, K', h, w) from raw score maps (N, C, h, w) and a fitted head."""
    weight = head.weight_ if classes is None else head.weight_[list(classes)]
    mean, scale = head.mean_.view(1, -1, 1, 1), head.scale_.view(1, -1, 1, 1)
    z = (raw_maps - mean) / scale
    return torch.einsum("kc,nchw->nkhw", weight.float(), z)


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (N, C, h, w) maps to ``size`` (half-pixel centres)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def input_view(image: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    """The part of ``image`` the model sees: shortest side resized to ``size``, centre-cropped.

    open_clip's eval transform does the same ("shortest" resize mode), so a map upsampled to
    ``size`` lies exactly over this view; masks go through it with ``Image.NEAREST``.
    """
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))), resample)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


# ---------------------------------------------------------------------------- batched, cached
class TokenCache:
    """LRU of spatial tokens per (backbone identity, token method, image digest).

    Tokens do not depend on the concept bank or the head, so one entry serves every model
    on the same backbone, every concept and every edit.
    """

    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return found

    def put(self, key: tuple, tokens: torch.Tensor) -> None:
        size = tokens.numel() * tokens.element_size()
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._items[key] = tokens
            self._bytes += size
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()


def image_digest(image: Image.Image) -> str:
    """A content key for a decoded image (its size, mode and pixels)."""
    digest = hashlib.sha256(f"{image.size}{image.mode}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def spatial_tokens(backbone, images: Sequence[Image.Image], method: MapMethod,
                   cache: TokenCache | None = None, batch_size: int = 64) -> torch.Tensor:
    """Tokens (N, h, w, d) of decoded images, batched, reusing ``cache`` where it has them."""
    keys = [(backbone.identity, method.tokens, image_digest(im)) for im in images] if cache else [None] * len(images)
    found = [cache.get(k) if cache else None for k in keys]
    missing = [i for i, t in enumerate(found) if t is None]
    for start in range(0, len(missing), batch_size):
        rows = missing[start:start + batch_size]
        batch = torch.stack([backbone.preprocess(images[i]) for i in rows])
        tokens = backbone.spatial_tokens(batch, method=method.tokens)
        for i, t in zip(rows, tokens, strict=True):
            found[i] = t.contiguous()
            if cache is not None:
                cache.put(keys[i], found[i])
    if not found:
        raise ShapeError("no images to map")
    return torch.stack(found)


def concept_maps(backbone, images: torch.Tensor | Sequence[Image.Image], bank, method: str | None = None,
                 size: int | None = None, temperature: float = DEFAULT_TEMPERATURE,
                 cache: TokenCache | None = None, batch_size: int = 64) -> torch.Tensor:
    """Concept maps (N, C, S, S) of preprocessed images (N, 3, H, W) or PIL images.

    ``size`` defaults to the backbone's input size (maps lie over :func:`input_view`).
    """
    chosen = parse_method(method, architecture(backbone))
    if isinstance(images, torch.Tensor):
        tokens = torch.cat([backbone.spatial_tokens(chunk, method=chosen.tokens)
                            for chunk in images.split(batch_size)])
    else:
        tokens = spatial_tokens(backbone, list(images), chosen, cache=cache, batch_size=batch_size)
    grid = maps_from_tokens(tokens, bank, chosen, temperature)
    return upsample(grid, size or backbone.image_size)


# ---------------------------------------------------------------------------- dense-CLIP tokens
# Training-free changes to a ViT's last block (registered into ml.backbone.SPATIAL_METHODS).
# Full attention makes every patch of the last block look like the class token's context;
# self-self attention (q-q, k-k) keeps each token attending to tokens like itself.


def _last_block_parts(visual, images: torch.Tensor):
    x = backbone_module._vit_blocks(visual, images, skip_last=True)  # noqa: SLF001 - same package
    last = visual.transformer.resblocks[-1]
    attn = getattr(last, "attn", None)
    if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise ConfigError("this ViT's last block has no fused q/k/v projection; use the 'patch' or 'maskclip' method")
    n, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(last.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    return x, last, q, k, v


def _attend(weights: torch.Tensor, v: torch.Tensor, last) -> torch.Tensor:
    n, heads, length, dh = v.shape
    mixed = (weights @ v).transpose(1, 2).reshape(n, length, heads * dh)
    return last.ls_1(last.attn.out_proj(mixed))


def _self_self(a: torch.Tensor) -> torch.Tensor:
    return torch.softmax(a @ a.transpose(-1, -2) * a.shape[-1] ** -0.5, dim=-1)


@backbone_module.register_spatial_method(
    "clearclip", ("vit",), "last block with query-query attention, no residual, no MLP (ClearCLIP)")
def _vit_clearclip(visual, images: torch.Tensor) -> torch.Tensor:
    _, last, q, _, v = _last_block_parts(visual, images)
    return backbone_module._vit_grid(visual, _attend(_self_self(q), v, last)[:, 1:])  # noqa: SLF001


@backbone_module.register_spatial_method(
    "kk", ("vit",), "last block with key-key attention, no residual, no MLP")
def _vit_kk(visual, images: torch.Tensor) -> torch.Tensor:
    _, last, _, k, v = _last_block_parts(visual, images)
    return backbone_module._vit_grid(visual, _attend(_self_self(k), v, last)[:, 1:])  # noqa: SLF001


@backbone_module.register_spatial_method(
    "csa", ("vit",), "last block with correlative attention softmax(qq)+softmax(kk), no residual, no MLP")
def _vit_csa(visual, images: torch.Tensor) -> torch.Tensor:
    _, last, q, k, v = _last_block_parts(visual, images)
    return backbone_module._vit_grid(visual, _attend(_self_self(q) + _self_self(k), v, last)[:, 1:])  # noqa: SLF001


@backbone_module.register_spatial_method(
    "sclip", ("vit",), "last block with correlative attention, residual and MLP kept (SCLIP)")
def _vit_sclip(visual, images: torch.Tensor) -> torch.Tensor:
    x, last, q, k, v = _last_block_parts(visual, images)
    x = x + _attend(_self_self(q) + _self_self(k), v, last)
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    return backbone_module._vit_grid(visual, x[:, 1:])  # noqa: SLF001

__all__ = ["CONTRASTS", "DEFAULT_MAP_METHOD", "DEFAULT_TEMPERATURE", "MapMethod", "TokenCache", "class_maps",
           "concept_maps", "contrast_maps", "image_digest", "input_view", "map_methods", "maps_from_tokens",
           "parse_method", "score_maps", "spatial_tokens", "upsample"]
