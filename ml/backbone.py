"""Image and text encoders: open_clip models behind one small interface.

Backbone specs (strings a user types on the command line or stores in a workspace):

=========================================  ==================================================
``open_clip:NAME``                          built-in architecture, random weights (seeded)
``open_clip:NAME@TAG``                      weights of an open_clip tag, only if already cached
``open_clip:NAME@/path/weights.safetensors`` a local checkpoint (.safetensors only: pickled
    .bin/.pt/.pth files are refused, since loading them would unpickle)
``open_clip:local-dir:/dir``                ``/dir/open_clip_config.json`` +
                                            ``/dir/open_clip_model.safetensors``
``demo``                                    the shipped demo backbone (``ml/demo/checkpoint``)
=========================================  ==================================================

Nothing here touches the network: ``HF_HUB_OFFLINE`` is set before open_clip is imported
and tags are resolved from local caches only.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # must precede the open_clip/huggingface_hub import

import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.modified_resnet import ModifiedResNet  # noqa: E402
from open_clip.transformer import VisionTransformer  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

from ml.errors import ConfigError, DataError, ShapeError  # noqa: E402
from ml.store import file_sha256  # noqa: E402

DEMO_DIR = Path(__file__).resolve().parent / "demo" / "checkpoint"
LOCAL_DIR = "local-dir:"
# Only safetensors: a .bin/.pt/.pth checkpoint is a pickle, and we never unpickle.
CHECKPOINT_SUFFIXES = (".safetensors",)
_SPEC_FORMAT = (
    "expected 'open_clip:NAME', 'open_clip:NAME@TAG_OR_CHECKPOINT', "
    "'open_clip:local-dir:/dir' or 'demo'"
)
_HASHES: dict[tuple, str] = {}  # (path, size, mtime_ns, inode) -> sha256, per process


@runtime_checkable
class Backbone(Protocol):
    identity: str  # sha256 over model, weights and preprocessing; keys every cache
    embed_dim: int  # dimension of the joint image/text space
    image_size: int  # side of the square model input
    device: torch.device

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...
    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...
    def spatial_tokens(self, images: torch.Tensor, method: str = "default") -> torch.Tensor: ...


@dataclass(frozen=True)
class BackboneSpec:
    model_name: str  # open_clip architecture name, or "local-dir:/abs/dir"
    pretrained: str | None = None  # open_clip tag, checkpoint path, or None for random weights

    def __str__(self) -> str:
        return f"open_clip:{self.model_name}" + (f"@{self.pretrained}" if self.pretrained else "")


def _check_model_name(name: str) -> None:
    known = open_clip.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known[:8])}, ..."
        raise ConfigError(f"unknown open_clip model {name!r}{hint}")


def parse_backbone_spec(spec: str) -> BackboneSpec:
    """Parse a backbone spec string (formats in the module docstring).

    Raises
    ------
    ConfigError
        The string does not follow a known format or names an unknown architecture.
    """
    text = str(spec).strip()
    if text == "demo":
        return BackboneSpec(LOCAL_DIR + str(DEMO_DIR))
    if not text.startswith("open_clip:"):
        raise ConfigError(f"bad backbone spec {spec!r}: {_SPEC_FORMAT}")
    rest = text[len("open_clip:"):]
    if rest.startswith(LOCAL_DIR):
        directory = rest[len(LOCAL_DIR):]
        if not directory:
            raise ConfigError(f"bad backbone spec {spec!r}: 'local-dir:' needs a directory")
        return BackboneSpec(LOCAL_DIR + str(Path(directory).expanduser()))
    if rest.startswith("hf-hub:"):
        raise ConfigError(f"bad backbone spec {spec!r}: hf-hub needs the network; download the "
                          "model and use 'open_clip:local-dir:/dir' instead")
    name, at, pretrained = rest.partition("@")  # architecture names never contain '@'
    if not name or (at and not pretrained):
        raise ConfigError(f"bad backbone spec {spec!r}: {_SPEC_FORMAT}")
    _check_model_name(name)
    return BackboneSpec(name, pretrained or None)


def load_backbone(spec: str | BackboneSpec, device: str | torch.device | None = None) -> OpenClipBackbone:
    """Build the backbone a spec names, on ``device`` (default: cuda if available, else cpu)."""
    parsed = spec if isinstance(spec, BackboneSpec) else parse_backbone_spec(spec)
    if parsed.model_name == LOCAL_DIR + str(DEMO_DIR) and not DEMO_DIR.is_dir():
        raise DataError(f"the demo backbone is missing: {DEMO_DIR} does not exist; build it with the "
                        "demo backbone training in ml/demo first")
    return OpenClipBackbone(parsed.model_name, parsed.pretrained, device=device)


def _cached_file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


def _resolve_tag(name: str, tag: str) -> tuple[str, dict]:
    """Find a tag's checkpoint in the local caches, never downloading it."""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"{tag!r} is neither a checkpoint file nor a pretrained tag of {name}; "
                          f"known tags: {', '.join(tags) or 'none'}")
    candidates: list[str] = []
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        hub = cfg["hf_hub"]  # "org/repo/file" or "org/repo/" (the default file name)
        repo, filename = (hub.rstrip("/"), "open_clip_pytorch_model.bin") if hub.endswith("/") else os.path.split(hub)
        names = ["open_clip_model.safetensors"] if filename == "open_clip_pytorch_model.bin" else []
        if filename.endswith((".bin", ".pth")):
            names.append(filename[:-4] + ".safetensors")
        for candidate in [*names, filename]:
            found = try_to_load_from_cache(repo_id=repo, filename=candidate)
            if isinstance(found, str):
                candidates.append(found)
    if cfg.get("url"):
        candidates.append(os.path.expanduser(os.path.join("~/.cache/clip", os.path.basename(cfg["url"]))))
    for path in candidates:
        if os.path.isfile(path) and path.endswith(CHECKPOINT_SUFFIXES):
            return path, cfg
    raise DataError(f"weights for {name}@{tag} are not cached on this machine and downloads are off; "
                    f"pass a checkpoint file instead: open_clip:{name}@/path/to/weights.safetensors")


class OpenClipBackbone:
    """An open_clip model as a :class:`Backbone`.

    Parameters
    ----------
    model_name : str
        Built-in architecture name (``open_clip.list_models()``) or ``"local-dir:/dir"``.
    pretrained : str or None
        None for random weights seeded with ``seed``, an open_clip tag cached offline, or a
        checkpoint file. Ignored for ``local-dir:`` models, whose folder holds the weights.
    device : str, torch.device or None
        Where the model runs; default cuda if available, else cpu.
    seed : int
        Seed of the random initialisation when ``pretrained`` is None.
    precision : {"auto", "fp32", "bf16"}
        "auto" runs bf16 autocast on CUDA and fp32 elsewhere. Outputs are always float32.
    image_size : int or None
        Override the architecture's input size (random weights or resizable checkpoints).
    batch_size : int
        Images or texts per forward pass.
    """

    def __init__(self, model_name: str, pretrained: str | None = None, device: str | torch.device | None = None,
                 seed: int = 0, precision: str = "auto", image_size: int | None = None, batch_size: int = 64):
        if precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        self.model_name = model_name
        self.pretrained = pretrained
        self.batch_size = int(batch_size)
        self.device = torch.device(device) if device is not None else \
            torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._bf16 = self.device.type == "cuda" and precision in ("auto", "bf16")
        kwargs: dict = {"precision": "fp32", "device": self.device}
        if image_size is not None:
            kwargs["force_image_size"] = int(image_size)
        model_identity, weights_identity = self._locate_weights(kwargs, seed)
        with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
            torch.manual_seed(seed)
            try:
                self.model = open_clip.create_model(model_name, pretrained=kwargs.pop("pretrained", None), **kwargs)
            except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as exc:  # a damaged checkpoint
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise DataError(f"cannot load weights for {model_name} ({weights_identity}): {first}") from None
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        pp = dict(open_clip.get_model_preprocess_cfg(self.model))
        size = pp["size"]
        if not isinstance(size, int):
            if len(set(size)) != 1:
                raise ConfigError(f"{model_name} takes non-square {tuple(size)} inputs, which are not supported")
            size = int(size[0])
        self.image_size = int(size)
        self.transform = open_clip.image_transform(
            self.image_size, is_train=False, mean=pp["mean"], std=pp["std"], interpolation=pp["interpolation"],
            resize_mode=pp["resize_mode"], fill_color=pp.get("fill_color", 0))
        self.embed_dim = int(getattr(self.model.visual, "output_dim", 0)) or int(
            self.encode_images(torch.zeros(1, 3, size, size)).shape[1])
        preprocessing = {"image_size": self.image_size, "mean": list(pp["mean"]), "std": list(pp["std"]),
                         "resize_mode": pp["resize_mode"], "interpolation": pp["interpolation"]}
        blob = json.dumps({"model": model_identity, "weights": weights_identity, "preprocessing": preprocessing},
                          sort_keys=True)
        self.identity = hashlib.sha256(blob.encode()).hexdigest()
        self.architecture = architecture_of(self.model.visual)

    def _locate_weights(self, kwargs: dict, seed: int) -> tuple[str, str]:
        """Check every file exists before open_clip runs; return (model, weights) identities."""
        name = self.model_name
        if name.startswith(LOCAL_DIR):
            directory = Path(name[len(LOCAL_DIR):])
            config, weights = directory / "open_clip_config.json", directory / "open_clip_model.safetensors"
            for needed in (directory, config, weights):
                if not needed.exists():
                    raise DataError(f"backbone folder is incomplete: {needed} does not exist")
            try:
                json.loads(config.read_text(encoding="utf-8"))["model_cfg"]
            except (OSError, ValueError, KeyError, TypeError):
                raise DataError(f"{config} is not an open_clip config (a JSON object with 'model_cfg')") from None
            return "local-dir:" + file_sha256(config), "sha256:" + _cached_file_hash(weights)
        _check_model_name(name)
        if self.pretrained is None:
            return name, f"random:{seed}"
        looks_like_path = any(s in self.pretrained for s in "/\\") or self.pretrained.endswith(CHECKPOINT_SUFFIXES)
        if looks_like_path or os.path.isfile(self.pretrained):
            path = Path(self.pretrained).expanduser()
            if not path.is_file():
                raise DataError(f"checkpoint file not found: {path}")
            if not path.name.endswith(CHECKPOINT_SUFFIXES):
                raise DataError(f"checkpoint {path} must end in one of {', '.join(CHECKPOINT_SUFFIXES)}")
            kwargs["pretrained"] = str(path)
            return name, "sha256:" + _cached_file_hash(path)
        path, cfg = _resolve_tag(name, self.pretrained)
        kwargs["pretrained"] = path
        kwargs["force_preprocess_cfg"] = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                                          if cfg.get(k) is not None}
        kwargs["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))  # the tag was trained with it
        return name, f"tag:{self.pretrained}"

    def _autocast(self):
        if self._bf16:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _check_images(self, images: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ShapeError(f"images must be (N, {', '.join(map(str, expected))}), got {shape}")

    def _batched(self, inputs: torch.Tensor, forward) -> torch.Tensor:
        outputs = []
        # no_grad rather than inference_mode: inference tensors cannot be saved for a later backward
        with torch.no_grad():
            for chunk in inputs.split(self.batch_size):
                with self._autocast():
                    out = forward(chunk.to(self.device, non_blocking=True))
                outputs.append(out.float().cpu())
        return torch.cat(outputs) if outputs else None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize, crop and normalise one PIL image into a (3, H, W) float tensor."""
        return self.transform(image.convert("RGB"))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) image embeddings, (N, 3, H, W) -> (N, d) float32 on CPU."""
        self._check_images(images)
        out = self._batched(images.float(), self.model.encode_image)
        return out if out is not None else torch.empty(0, getattr(self, "embed_dim", 0))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Raw text embeddings with the model's own tokenizer, (N,) -> (N, d) float32 on CPU."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise DataError("encode_texts expects a list of strings")
        if len(texts) == 0:
            return torch.empty(0, self.embed_dim)
        return self._batched(self.tokenizer(list(texts)), self.model.encode_text)

    def spatial_tokens(self, images: torch.Tensor, method: str = "default") -> torch.Tensor:
        """Per-location embeddings in the joint space, (N, 3, H, W) -> (N, h, w, d) float32 on CPU.

        ``method`` is a key of :data:`SPATIAL_METHODS` valid for this architecture, or
        "default" (:data:`DEFAULT_SPATIAL_METHOD`).
        """
        valid = sorted(k for k, m in SPATIAL_METHODS.items() if self.architecture in m.architectures)
        chosen = DEFAULT_SPATIAL_METHOD.get(self.architecture) if method == "default" else method
        if chosen not in valid:
            raise ConfigError(f"unknown spatial-token method {method!r} for a {self.architecture} backbone; "
                              f"valid: {', '.join(valid) or 'none'}")
        self._check_images(images)
        fn = SPATIAL_METHODS[chosen].fn
        out = self._batched(images.float(), lambda x: fn(self.model.visual, x))
        return out if out is not None else torch.empty(0, 0, 0, self.embed_dim)


# --- dense (per-location) embeddings -------------------------------------------------------
# Registered by name so that more dense-CLIP methods can be added and compared later.


@dataclass(frozen=True)
class SpatialMethod:
    fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (visual tower, images) -> (N, h, w, d)
    architectures: tuple[str, ...]  # architecture_of() values it applies to
    description: str = ""


SPATIAL_METHODS: dict[str, SpatialMethod] = {}
DEFAULT_SPATIAL_METHOD: dict[str, str] = {"vit": "maskclip", "resnet": "value"}


def register_spatial_method(name: str, architectures: tuple[str, ...], description: str = ""):
    """Decorator adding ``fn(visual, images) -> (N, h, w, d)`` to :data:`SPATIAL_METHODS`."""
    def decorate(fn):
        SPATIAL_METHODS[name] = SpatialMethod(fn, tuple(architectures), description)
        return fn
    return decorate


def architecture_of(visual: torch.nn.Module) -> str:
    """"vit" for open_clip's VisionTransformer, "resnet" for ModifiedResNet, else "other"."""
    if isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None:
        return "vit"  # attention-pooled (CoCa) towers have no per-patch joint space
    if isinstance(visual, ModifiedResNet) and visual.attnpool is not None:
        return "resnet"
    return "other"


def _vit_grid(visual, tokens: torch.Tensor) -> torch.Tensor:
    """Project patch tokens into the joint space and lay them out as (N, h, w, d)."""
    joint = visual.ln_post(tokens)
    if visual.proj is not None:
        joint = joint @ visual.proj
    h, w = visual.grid_size
    return joint.reshape(joint.shape[0], h, w, joint.shape[-1])


def _vit_blocks(visual, images: torch.Tensor, skip_last: bool) -> torch.Tensor:
    # _embeds (open_clip 3.x) = patchify + class token + positions + ln_pre, as in forward()
    x = visual._embeds(images)  # noqa: SLF001 - open_clip has no public name for it
    blocks = visual.transformer.resblocks
    batch_first = getattr(visual.transformer, "batch_first", True)
    x = x if batch_first else x.transpose(0, 1)
    for block in (blocks[:-1] if skip_last else blocks):
        x = block(x)
    return x if batch_first else x.transpose(0, 1)


@register_spatial_method("patch", ("vit",), "patch tokens of the last layer, ln_post and proj applied")
def _vit_patch(visual, images: torch.Tensor) -> torch.Tensor:
    return _vit_grid(visual, _vit_blocks(visual, images, skip_last=False)[:, 1:])


@register_spatial_method("maskclip", ("vit",), "value path of the last block, no attention (MaskCLIP)")
def _vit_maskclip(visual, images: torch.Tensor) -> torch.Tensor:
    # Attention mixes every patch with the class token's context; the value path keeps each
    # patch's own content, which is what makes it localise (Zhou et al., MaskCLIP, 2022).
    x = _vit_blocks(visual, images, skip_last=True)
    last = visual.transformer.resblocks[-1]
    y = last.ln_1(x)
    width = y.shape[-1]
    bias = last.attn.in_proj_bias
    values = F.linear(y, last.attn.in_proj_weight[2 * width:], None if bias is None else bias[2 * width:])
    return _vit_grid(visual, last.attn.out_proj(values)[:, 1:])


@register_spatial_method("value", ("resnet",), "attention pool's value + output projection at every position")
def _resnet_value(visual, images: torch.Tensor) -> torch.Tensor:
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    n, _, h, w = x.shape
    pool = visual.attnpool
    tokens = x.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(x.dtype)
    return pool.c_proj(pool.v_proj(tokens)).reshape(n, h, w, -1)


# The training-free dense-CLIP methods (clearclip, kk, csa, sclip) live with the concept maps;
# importing them here keeps the registry the same whichever module is imported first.
import ml.cam  # noqa: E402,F401  - registers into SPATIAL_METHODS (a cycle that is safe at the end)
