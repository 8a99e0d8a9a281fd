"""The demo world: a seeded, configurable synthetic image world with full ground truth.

Each image shows one object (its shape is the class) on a textured ground. A
:class:`WorldConfig` fixes the vocabulary, the image size, the split sizes and the
spurious correlation: in every split but ``test_shifted`` a class sits on its paired
background with probability ``correlation``; in ``test_shifted`` it never does. With
``pairing=None`` the background is independent of the shape, which is the world the
demo backbone is pretrained on (pretraining on the biased world ruins the demo).

Writing to disk (``write_world``) and sample grids live in :mod:`ml.demo.io`.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ml.demo import render
from ml.demo.captions import concept_phrases, make_caption
from ml.errors import ConfigError, DataError

WORLD_VERSION = 2  # bump when rendering or sampling changes, so written worlds are regenerated
GROUPS = ("shape", "color", "pattern", "size", "background")
SHIFTED_SPLIT = "test_shifted"
POOL_SPLIT = "concept_pool"
DEFAULT_CONFIG_PATH = Path(__file__).with_name("default_world.json")
PRETRAIN_OCCLUSION = 0.1


@dataclass
class WorldConfig:
    """Everything that determines a world; two equal configs give byte-identical worlds."""

    name: str = "default"
    seed: int = 0
    image_size: int = 64
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle", "star"])
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    patterns: list[str] = field(default_factory=lambda: ["plain", "striped", "dotted"])
    sizes: list[str] = field(default_factory=lambda: ["small", "large"])
    backgrounds: list[str] = field(default_factory=lambda: ["water", "grass", "sand", "snow"])
    # class -> background it co-occurs with in training-distribution splits; None = independent
    pairing: dict[str, str] | None = field(
        default_factory=lambda: {"circle": "water", "square": "grass", "triangle": "sand", "star": "snow"})
    correlation: float = 0.95
    counts: dict[str, int] = field(
        default_factory=lambda: {"train": 1000, "val": 400, "test": 1000, "test_shifted": 1000})
    occlusion: float = 0.3          # share of images with a branch across the object
    concept_examples: int = 60      # positives (and as many negatives) per concept folder
    concept_pool: int = 0           # unbiased images the concept folders draw from; 0 = automatic

    def __post_init__(self) -> None:
        known = {"shapes": render.SHAPES, "colors": tuple(render.OBJECT_RGB), "patterns": render.PATTERNS,
                 "sizes": tuple(render.SIZE_RADIUS), "backgrounds": render.BACKGROUNDS}
        for attr, allowed in known.items():
            values = list(getattr(self, attr))
            setattr(self, attr, values)
            bad = [v for v in values if v not in allowed]
            if bad or len(values) < 2 or len(set(values)) != len(values):
                raise ConfigError(f"{attr} must be 2+ distinct values from {list(allowed)}; got {values}")
        if not 0.0 <= float(self.correlation) <= 1.0:
            raise ConfigError(f"correlation must lie in [0, 1], got {self.correlation}")
        if self.pairing is not None:
            if sorted(self.pairing) != sorted(self.shapes) or any(b not in self.backgrounds for b in self.pairing.values()):
                raise ConfigError(f"pairing must map every shape {self.shapes} to one of {self.backgrounds}")
        elif SHIFTED_SPLIT in self.counts:
            raise ConfigError(f"a {SHIFTED_SPLIT!r} split needs a pairing (there is nothing to shift from)")
        if self.image_size < 16 or self.image_size % 8:
            raise ConfigError(f"image_size must be a multiple of 8 and at least 16, got {self.image_size}")
        if any(not isinstance(n, int) or n < 0 for n in self.counts.values()) or POOL_SPLIT in self.counts:
            raise ConfigError(f"counts must map split names (not {POOL_SPLIT!r}) to counts >= 0: {self.counts}")
        if not 0.0 <= self.occlusion <= 1.0 or self.concept_examples < 2:
            raise ConfigError("occlusion must lie in [0, 1] and concept_examples be at least 2")

    # --- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> WorldConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown world config fields: {sorted(unknown)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> WorldConfig:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read world config {path}: {exc}") from None

    def replace(self, **changes) -> WorldConfig:
        return WorldConfig.from_dict({**self.to_dict(), **changes})

    def config_hash(self) -> str:
        blob = json.dumps({"version": WORLD_VERSION, "config": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def values(self, group: str) -> list[str]:
        return {"shape": self.shapes, "color": self.colors, "pattern": self.patterns,
                "size": self.sizes, "background": self.backgrounds}[group]

    @property
    def pool_size(self) -> int:
        # Twice the examples times the largest group gives each value about 2x the positives it needs.
        auto = 2 * self.concept_examples * max(len(self.values(g)) for g in GROUPS)
        return self.concept_pool or auto


def default_config() -> WorldConfig:
    """The downstream demo world (biased training distribution) shipped in default_world.json."""
    return WorldConfig.load(DEFAULT_CONFIG_PATH)


def pretrain_config(seed: int = 1000) -> WorldConfig:
    """The backbone-pretraining world: same vocabulary, background independent of shape.

    Fewer occluded objects than downstream (0.1 against 0.3), as pretraining photos are
    mostly clean: with many occluders the small ViT learnt shape far more slowly.
    """
    return default_config().replace(name="pretrain", seed=seed, pairing=None, counts={"train": 0},
                                    occlusion=PRETRAIN_OCCLUSION)


@dataclass(frozen=True)
class Concept:
    name: str
    kind: str       # "object" | "background"
    group: str      # one of GROUPS
    value: str      # the attribute value, e.g. "water" for "water background"
    phrases: tuple[str, ...]


def concept_vocabulary(config: WorldConfig) -> list[Concept]:
    """All concepts of a world, grouped in GROUPS order."""
    out = []
    for group in GROUPS:
        for value in config.values(group):
            name = f"{value} background" if group == "background" else value
            kind = "background" if group == "background" else "object"
            out.append(Concept(name, kind, group, value, tuple(concept_phrases(group, value))))
    return out


@dataclass
class Split:
    """One split held in memory. ``attributes[:, g]`` indexes ``config.values(GROUPS[g])``."""

    name: str
    ids: list[str]
    images: np.ndarray      # (N, H, W, 3) uint8
    masks: np.ndarray       # (N, H, W) bool, visible object pixels
    attributes: np.ndarray  # (N, 5) int64
    occluded: np.ndarray    # (N,) bool
    captions: list[str]

    @property
    def labels(self) -> np.ndarray:
        return self.attributes[:, 0]

    def presence(self, config: WorldConfig) -> np.ndarray:
        """(N, n_concepts) bool: which concepts of :func:`concept_vocabulary` each image shows."""
        cols = []
        for g, group in enumerate(GROUPS):
            cols.append(self.attributes[:, g][:, None] == np.arange(len(config.values(group)))[None, :])
        return np.concatenate(cols, axis=1)


def _split_key(seed: int, split: str) -> list[int]:
    return [int(seed), zlib.crc32(split.encode())]


def sample_attributes(config: WorldConfig, split: str, n: int) -> np.ndarray:
    """(n, 5) attribute indices for a split, with exact class and background quotas."""
    rng = np.random.default_rng(_split_key(config.seed, split) + [0])
    n_cls, n_bg = len(config.shapes), len(config.backgrounds)
    labels = np.arange(n) % n_cls
    backgrounds = np.empty(n, dtype=np.int64)
    independent = config.pairing is None or split == POOL_SPLIT
    for k in range(n_cls):
        idx = np.flatnonzero(labels == k)
        if independent:
            backgrounds[idx] = rng.permutation(np.arange(len(idx)) % n_bg)
            continue
        paired = config.backgrounds.index(config.pairing[config.shapes[k]])
        others = [b for b in range(n_bg) if b != paired]
        n_paired = 0 if split == SHIFTED_SPLIT else int(round(config.correlation * len(idx)))
        rest = np.array([others[i % len(others)] for i in rng.permutation(len(idx) - n_paired)], dtype=np.int64)
        backgrounds[idx] = rng.permutation(np.concatenate([np.full(n_paired, paired, dtype=np.int64), rest]))
    attrs = np.stack([labels,
                      rng.integers(len(config.colors), size=n),
                      rng.integers(len(config.patterns), size=n),
                      rng.integers(len(config.sizes), size=n),
                      backgrounds], axis=1).astype(np.int64)
    return attrs[rng.permutation(n)]


def render_rows(config: WorldConfig, split: str, attributes: np.ndarray, start: int = 0,
                caption_drop: float = 0.15) -> Split:
    """Render given attribute rows; image i's pixels depend only on (seed, split, start + i)."""
    n, size = len(attributes), config.image_size
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    occluded = np.empty(n, dtype=bool)
    captions, ids = [], []
    key = _split_key(config.seed, split)
    for i, row in enumerate(attributes):
        index = start + i
        rng = np.random.default_rng(key + [1, index])
        values = {g: config.values(g)[int(row[j])] for j, g in enumerate(GROUPS)}
        occluded[i] = rng.random() < config.occlusion
        scene = render.Scene(values["shape"], values["color"], values["pattern"], values["size"],
                             values["background"], bool(occluded[i]))
        images[i], masks[i] = render.render_scene(scene, rng, size)
        captions.append(make_caption(values, rng, drop=caption_drop)[0])
        ids.append(f"{'pool' if split == POOL_SPLIT else split}_{index:05d}")
    return Split(split, ids, images, masks, np.asarray(attributes, dtype=np.int64), occluded, captions)


def generate_split(config: WorldConfig, split: str, n: int | None = None) -> Split:
    """Render one split (``concept_pool`` is the unbiased pool the concept folders use)."""
    if n is None:
        if split == POOL_SPLIT:
            n = config.pool_size
        elif split in config.counts:
            n = config.counts[split]
        else:
            raise ConfigError(f"unknown split {split!r}; the config has {sorted(config.counts)}")
    return render_rows(config, split, sample_attributes(config, split, n))


def generate_world(config: WorldConfig, include_pool: bool = True) -> dict[str, Split]:
    """Every split of the config (and the concept pool), in memory."""
    names = list(config.counts) + ([POOL_SPLIT] if include_pool else [])
    return {name: generate_split(config, name) for name in names}


def concept_example_indices(config: WorldConfig, pool: Split) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each concept, seeded pool indices of its positive and negative examples."""
    presence = pool.presence(config)
    out = {}
    for c, concept in enumerate(concept_vocabulary(config)):
        rng = np.random.default_rng(_split_key(config.seed, "concepts") + [c])
        pos, neg = np.flatnonzero(presence[:, c]), np.flatnonzero(~presence[:, c])
        k = min(config.concept_examples, len(pos), len(neg))
        if k < 2:
            raise DataError(f"concept {concept.name!r} has too few pool examples; raise concept_pool")
        out[concept.name] = (np.sort(rng.permutation(pos)[:k]), np.sort(rng.permutation(neg)[:k]))
    return out


def write_world(config: WorldConfig, out_dir: str | Path) -> Path:
    """Write the world to disk (see :mod:`ml.demo.writer` for the layout); idempotent."""
    from ml.demo.writer import write_world as _write  # the writer imports this module

    return _write(config, out_dir)
