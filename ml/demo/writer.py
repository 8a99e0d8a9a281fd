"""Write a demo world to disk in the formats the real loaders read, and draw sample grids.

Layout of ``write_world(config, out_dir)``::

    world.json                      config, hash, classes, concept vocabulary (kind, group, phrases)
    manifest.csv                    path,label,split,group      (group = background name)
    attributes.csv                  image,concept,present       (every image x concept)
    captions.csv                    image,caption
    images/<split>/<id>.png         the task images
    masks/<id>.png                  visible object pixels = 255; background concepts own the rest
    concept_pool/pool_<i>.png       unbiased images the concept folders link to
    concepts/<concept>/positives|negatives/pool_<i>.png   (hard links into concept_pool)
    .complete                       the config hash, written last

The directory is built beside ``out_dir`` and renamed into place, so a reader never
sees half a world, and a rerun with the same config finds ``.complete`` and does nothing.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ml.demo.world import (
    GROUPS,
    POOL_SPLIT,
    SHIFTED_SPLIT,
    WORLD_VERSION,
    WorldConfig,
    concept_example_indices,
    concept_vocabulary,
    generate_split,
)
from ml.errors import DataError

MARKER = ".complete"
_OWNED = {"world.json", "manifest.csv", "attributes.csv", "captions.csv", "images", "masks", "concept_pool",
          "concepts", MARKER}


def is_complete(config: WorldConfig, out_dir: str | Path) -> bool:
    marker = Path(out_dir) / MARKER
    return marker.is_file() and marker.read_text().strip() == config.config_hash()


def world_metadata(config: WorldConfig) -> dict:
    """The world.json document (also useful without writing a world)."""
    return {
        "format": "pcbm-demo-world",
        "version": WORLD_VERSION,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "classes": list(config.shapes),
        "groups": list(GROUPS),
        "concepts": [{"name": c.name, "kind": c.kind, "group": c.group, "value": c.value, "phrases": list(c.phrases)}
                     for c in concept_vocabulary(config)],
        "splits": {name: {"count": n, "shifted": name == SHIFTED_SPLIT} for name, n in config.counts.items()},
        "files": {"manifest": "manifest.csv", "attributes": "attributes.csv", "captions": "captions.csv",
                  "masks": "masks/{image_id}.png", "concepts": "concepts"},
        "masks": "255 = visible object pixels (object concepts); 0 = background pixels (background concepts)",
    }


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem or no hard links: a copy costs a few KB
        shutil.copyfile(src, dst)


def _write_into(config: WorldConfig, root: Path) -> None:
    concepts = concept_vocabulary(config)
    (root / "masks").mkdir(parents=True)
    manifest, attributes, captions = [], [], []
    for split in config.counts:
        data = generate_split(config, split)
        (root / "images" / split).mkdir(parents=True)
        presence = data.presence(config)
        for i, image_id in enumerate(data.ids):
            rel = f"images/{split}/{image_id}.png"
            _save_png(data.images[i], root / rel)
            _save_png(data.masks[i].astype(np.uint8) * 255, root / "masks" / f"{image_id}.png")
            row = data.attributes[i]
            manifest.append((rel, config.shapes[row[0]], split, config.backgrounds[row[4]]))
            attributes.extend((rel, c.name, int(presence[i, j])) for j, c in enumerate(concepts))
            captions.append((rel, data.captions[i]))

    pool = generate_split(config, POOL_SPLIT)
    (root / "concept_pool").mkdir()
    for i, image_id in enumerate(pool.ids):
        _save_png(pool.images[i], root / "concept_pool" / f"{image_id}.png")
    for name, (pos, neg) in concept_example_indices(config, pool).items():
        for sub, idx in (("positives", pos), ("negatives", neg)):
            folder = root / "concepts" / name / sub
            folder.mkdir(parents=True)
            for i in idx:
                _link_or_copy(root / "concept_pool" / f"{pool.ids[i]}.png", folder / f"{pool.ids[i]}.png")

    for filename, header, rows in (("manifest.csv", ("path", "label", "split", "group"), manifest),
                                   ("attributes.csv", ("image", "concept", "present"), attributes),
                                   ("captions.csv", ("image", "caption"), captions)):
        with open(root / filename, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    (root / "world.json").write_text(json.dumps(world_metadata(config), indent=2) + "\n")
    (root / MARKER).write_text(config.config_hash() + "\n")


def write_world(config: WorldConfig, out_dir: str | Path) -> Path:
    """Write ``config``'s world to ``out_dir``; a no-op when it is already there and complete."""
    out = Path(out_dir)
    if is_complete(config, out):
        return out
    if out.exists():
        foreign = [p.name for p in out.iterdir() if p.name not in _OWNED]
        if foreign:
            raise DataError(f"{out} holds files a demo world does not write ({foreign[:3]}); "
                            "choose an empty or new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        _write_into(config, tmp)
        if out.exists():
            shutil.rmtree(out)  # an older or half-written world of ours
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def sample_grid(config: WorldConfig, out_png: str | Path, per_split: int = 8, zoom: int = 2) -> Path:
    """Render ``per_split`` images of every split into one labelled PNG (a row per split)."""
    rows = []
    for split in list(config.counts) + [POOL_SPLIT]:
        n = per_split if split == POOL_SPLIT else min(per_split, config.counts[split])
        if n:
            data = generate_split(config, split, n=n)
            rows.append((split, data, n))
    size, label_w, gap, caption_h = config.image_size * zoom, 120, 4, 12
    width = label_w + per_split * (size + gap)
    height = len(rows) * (size + caption_h + gap) + gap
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    for r, (split, data, n) in enumerate(rows):
        top = gap + r * (size + caption_h + gap)
        draw.text((6, top + size // 2 - 6), split, fill=(20, 20, 20))
        for i in range(n):
            left = label_w + i * (size + gap)
            tile = Image.fromarray(data.images[i]).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (left, top))
            row = data.attributes[i]
            tag = f"{config.shapes[row[0]]}/{config.backgrounds[row[4]]}"
            draw.text((left + 2, top + size), tag, fill=(60, 60, 60))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
