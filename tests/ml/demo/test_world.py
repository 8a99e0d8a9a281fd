"""The demo world: determinism, the spurious correlation, masks, written formats, idempotence."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ml.demo import (
    WorldConfig,
    concept_vocabulary,
    default_config,
    generate_split,
    pretrain_config,
    sample_grid,
    write_world,
)
from ml.demo.captions import make_caption
from ml.demo.world import POOL_SPLIT, SHIFTED_SPLIT
from ml.errors import ConfigError, DataError


def tiny(**changes) -> WorldConfig:
    base = dict(name="tiny", image_size=32, counts={"train": 40, "val": 8, "test": 8, "test_shifted": 16},
                concept_examples=4, correlation=0.9)
    return default_config().replace(**{**base, **changes})


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_default_config_is_the_biased_downstream_world():
    config = default_config()
    assert config.image_size == 64 and config.correlation == pytest.approx(0.95)
    assert sorted(config.pairing) == sorted(config.shapes)
    assert set(config.counts) >= {"train", "val", "test", SHIFTED_SPLIT}
    assert pretrain_config().pairing is None


def test_config_roundtrips_through_json_and_rejects_bad_values(tmp_path):
    config = tiny(seed=5)
    config.save(tmp_path / "w.json")
    again = WorldConfig.load(tmp_path / "w.json")
    assert again == config and again.config_hash() == config.config_hash()
    assert tiny(seed=6).config_hash() != config.config_hash()
    with pytest.raises(ConfigError):
        tiny(correlation=1.5)
    with pytest.raises(ConfigError):
        tiny(shapes=["circle", "blob"])
    with pytest.raises(ConfigError):
        tiny(pairing={"circle": "water"})
    with pytest.raises(ConfigError):
        WorldConfig.from_dict({**config.to_dict(), "colour": "red"})
    with pytest.raises(ConfigError):
        tiny(pairing=None)  # a shifted split needs a pairing to shift from


def test_generation_is_deterministic_for_a_seed_and_differs_across_seeds():
    a, b = generate_split(tiny(), "train"), generate_split(tiny(), "train")
    assert a.images.shape == (40, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.images.tobytes() == b.images.tobytes() and a.captions == b.captions
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.attributes, b.attributes)
    c = generate_split(tiny(seed=1), "train")
    assert a.images.tobytes() != c.images.tobytes()
    assert generate_split(tiny(), "val").images.tobytes() != a.images[:8].tobytes()


def test_world_is_textured_not_flat():
    split = generate_split(tiny(), "train")
    background = split.images[~np.broadcast_to(split.masks[..., None], split.images.shape)].reshape(-1, 3)
    assert background.std(axis=0).min() > 10  # textures, light and noise, not one flat colour
    assert split.occluded.any() and not split.occluded.all()


def test_correlation_holds_in_train_and_is_broken_in_test_shifted():
    config = tiny(correlation=0.9, counts={"train": 400, "test": 200, "test_shifted": 200})
    for name, low, high in (("train", 0.87, 0.93), ("test", 0.87, 0.93), (SHIFTED_SPLIT, 0.0, 0.0)):
        split = generate_split(config, name)
        shapes = [config.shapes[i] for i in split.attributes[:, 0]]
        grounds = [config.backgrounds[i] for i in split.attributes[:, 4]]
        paired = np.mean([config.pairing[s] == g for s, g in zip(shapes, grounds, strict=False)])
        assert low <= paired <= high, (name, paired)
        assert set(Counter(shapes).values()) == {len(shapes) // 4}  # classes balanced exactly
    shifted = generate_split(config, SHIFTED_SPLIT)
    assert len(set(map(tuple, shifted.attributes[:, [0, 4]]))) == 4 * 3  # every off-pairing combination
    pool = generate_split(config, POOL_SPLIT, n=160)
    assert 0.15 < np.mean([config.pairing[config.shapes[s]] == config.backgrounds[b]
                           for s, b in pool.attributes[:, [0, 4]]]) < 0.35  # pool is unbiased (~1/4)


def test_masks_cover_the_visible_object():
    config = tiny(counts={"train": 60})
    split = generate_split(config, "train")
    areas = split.masks.reshape(len(split.ids), -1).mean(1)
    assert (areas > 0.02).all() and (areas < 0.5).all()
    presence = split.presence(config)
    kinds = np.array([c.kind == "object" for c in concept_vocabulary(config)])
    assert presence[:, kinds].sum(1).tolist() == [4] * 60 and presence[:, ~kinds].sum(1).tolist() == [1] * 60
    # Where the mask says object, the pixels carry the object's colour: red objects are redder inside.
    red = config.colors.index("red")
    for i in np.flatnonzero(split.attributes[:, 1] == red):
        img = split.images[i].astype(float)
        inside, outside = img[split.masks[i]], img[~split.masks[i]]
        assert (inside[:, 0] - inside[:, 1]).mean() > (outside[:, 0] - outside[:, 1]).mean() + 20


def test_captions_vary_wording_and_word_order():
    rng = np.random.default_rng(0)
    values = {"shape": "star", "color": "red", "pattern": "striped", "size": "large", "background": "snow"}
    captions = {make_caption(values, rng)[0] for _ in range(300)}
    assert len(captions) > 100
    assert any(c.startswith("on ") or c.startswith("in ") for c in captions)  # place first
    assert any("that is" in c for c in captions) and any("crimson" in c or "scarlet" in c for c in captions)
    assert any(c.index("star") < c.index("red") for c in captions if "star" in c and "red" in c)


def test_write_world_formats_parse(tmp_path):
    config = tiny()
    out = write_world(config, tmp_path / "world")
    with open(out / "manifest.csv") as handle:
        manifest = list(csv.DictReader(handle))
    assert list(manifest[0]) == ["path", "label", "split", "group"]
    assert Counter(r["split"] for r in manifest) == config.counts
    assert {r["label"] for r in manifest} == set(config.shapes) and {r["group"] for r in manifest} <= set(config.backgrounds)
    assert all((out / r["path"]).is_file() and (out / "masks" / (Path(r["path"]).stem + ".png")).is_file()
               for r in manifest)

    meta = json.loads((out / "world.json").read_text())
    names = [c["name"] for c in meta["concepts"]]
    assert "water background" in names and "striped" in names and meta["classes"] == config.shapes
    assert {c["kind"] for c in meta["concepts"]} == {"object", "background"}
    assert all(c["phrases"] for c in meta["concepts"]) and WorldConfig.from_dict(meta["config"]) == config

    with open(out / "attributes.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(manifest) * len(names)
    assert {(r["image"], r["concept"]) for r in rows} == {(m["path"], n) for m in manifest for n in names}
    present = {(r["image"], r["concept"]) for r in rows if r["present"] == "1"}
    assert all((m["path"], m["label"]) in present and (m["path"], f"{m['group']} background") in present
               for m in manifest)

    from PIL import Image
    first = manifest[0]["path"]
    mask = np.array(Image.open(out / "masks" / (Path(first).stem + ".png")))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    for name in names:
        for sub in ("positives", "negatives"):
            assert len(list((out / "concepts" / name / sub).glob("*.png"))) == config.concept_examples
    with open(out / "captions.csv") as handle:
        assert len(list(csv.DictReader(handle))) == len(manifest)


def test_write_world_is_idempotent_and_byte_identical(tmp_path):
    config = tiny(counts={"train": 12, "test_shifted": 4})
    out = write_world(config, tmp_path / "a")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    write_world(config, out)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert _tree_bytes(out) == _tree_bytes(write_world(config, tmp_path / "b"))
    other = write_world(config.replace(seed=9), out)  # a new config replaces the old world
    assert (other / ".complete").read_text().strip() == config.replace(seed=9).config_hash()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError):
        write_world(config, tmp_path / "mine")


def test_sample_grid_renders_a_row_per_split(tmp_path):
    from PIL import Image
    path = sample_grid(tiny(), tmp_path / "grid.png", per_split=3)
    width, height = Image.open(path).size
    assert width > 3 * 64 and height > 5 * 64  # four splits and the concept pool
