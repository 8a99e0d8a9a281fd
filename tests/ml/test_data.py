import io
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from ml.data import (
    ConceptExamples,
    load_attribute_table,
    load_concept_examples,
    load_dataset,
    load_image_folder,
    load_manifest,
    open_image,
)
from ml.errors import DataError


def _png(path: Path, color=(200, 10, 10), size=(8, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


# --- open_image -----------------------------------------------------------------------------

def test_open_image_decodes_to_rgb(tmp_path):
    image = open_image(_png(tmp_path / "a.png", color=(1, 2, 3), size=(5, 4)))
    assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((0, 0)) == (1, 2, 3)
    _png(tmp_path / "gray.png", color=77, mode="L")
    assert open_image(tmp_path / "gray.png").getpixel((1, 1)) == (77, 77, 77)
    _png(tmp_path / "alpha.webp", color=(9, 8, 7, 255), mode="RGBA")
    assert open_image(tmp_path / "alpha.webp").mode == "RGB"
    buffer = io.BytesIO()
    Image.new("RGB", (3, 3), (0, 255, 0)).save(buffer, format="JPEG")
    assert open_image(buffer.getvalue()).size == (3, 3)


def test_open_image_takes_first_gif_frame(tmp_path):
    frames = [Image.new("P", (4, 4), i) for i in (10, 200)]
    for frame in frames:
        frame.putpalette([v for i in range(256) for v in (i, 0, 0)])
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert open_image(tmp_path / "anim.gif").getpixel((0, 0)) == (10, 0, 0)


def test_open_image_refuses_bad_files(tmp_path):
    with pytest.raises(DataError, match="missing.png"):
        open_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match="notes.png"):
        open_image(tmp_path / "notes.png")
    full = _png(tmp_path / "full.png", size=(64, 64)).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="cut.png"):
        open_image(tmp_path / "cut.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "image.tiff")
    with pytest.raises(DataError, match="allowed format"):
        open_image(tmp_path / "image.tiff")
    with pytest.raises(DataError, match="over the limit"):
        open_image(_png(tmp_path / "big.png", size=(100, 100)), max_pixels=5000)


def test_open_image_refuses_decompression_bomb_header(tmp_path):
    # a tiny file whose header claims 100000 x 100000 pixels: refused before decoding
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(data)
    with pytest.raises(DataError, match="bomb.png"):
        open_image(tmp_path / "bomb.png")
    with pytest.raises(DataError):
        open_image(data)


# --- image folders and manifests ------------------------------------------------------------

def test_image_folder_flat(tmp_path):
    for name in ("cat/1.png", "cat/2.jpg", "dog/sub/3.png", "ant/4.PNG"):
        _png(tmp_path / name)
    (tmp_path / "cat" / "README.txt").write_text("ignored")
    _png(tmp_path / "cat" / ".hidden.png")
    dataset = load_image_folder(tmp_path)
    assert dataset.classes == ["ant", "cat", "dog"]
    assert [r.image_id for r in dataset] == ["ant/4.PNG", "cat/1.png", "cat/2.jpg", "dog/sub/3.png"]
    assert dataset.labels_tensor().tolist() == [0, 1, 1, 2]
    assert dataset.labels_tensor().dtype == torch.long
    assert dataset.splits == ["train"] and dataset.groups == []
    assert all(r.path.is_absolute() and r.path.is_file() for r in dataset)


def test_image_folder_with_splits(tmp_path):
    for name in ("train/cat/1.png", "train/dog/2.png", "validation/cat/3.png", "test/dog/4.png"):
        _png(tmp_path / name)
    dataset = load_image_folder(tmp_path)
    assert dataset.classes == ["cat", "dog"]
    assert sorted(dataset.splits) == ["test", "train", "val"]
    val = dataset.split("val")
    assert [r.image_id for r in val] == ["validation/cat/3.png"] and val.classes == ["cat", "dog"]
    assert dataset.split("test").labels_tensor().tolist() == [1]
    with pytest.raises(DataError, match="no split 'dev'"):
        dataset.split("dev")


def test_class_folder_named_like_a_split_is_still_a_class(tmp_path):
    _png(tmp_path / "train" / "1.png")  # images directly inside: 'train' is a class here
    _png(tmp_path / "test" / "2.png")
    dataset = load_image_folder(tmp_path)
    assert dataset.classes == ["test", "train"] and dataset.splits == ["train"]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty")
    _png(tmp_path / "data" / "cat" / "1.png")
    with pytest.raises(DataError, match="class 'dog' has no images"):
        load_image_folder(tmp_path / "data", classes=["cat", "dog"])
    with pytest.raises(DataError, match="cat"):
        load_image_folder(tmp_path / "data", classes=["dog"])
    assert load_image_folder(tmp_path / "data", classes=["cat"]).classes == ["cat"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest(tmp_path, suffix):
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png")
    _png(tmp_path / "imgs" / "c.png")
    frame = pd.DataFrame({"path": ["imgs/a.png", "imgs/b.png", "imgs/c.png"], "label": ["zebra", "ant", "zebra"],
                          "split": ["train", "", "test"], "group": ["water", "land", None]})
    manifest = tmp_path / f"manifest{suffix}"
    frame.to_csv(manifest, index=False) if suffix == ".csv" else frame.to_parquet(manifest)
    dataset = load_dataset(manifest)
    assert dataset.classes == ["ant", "zebra"]
    assert dataset.labels_tensor().tolist() == [1, 0, 1]
    assert [r.split for r in dataset] == ["train", "train", "test"]
    assert [r.group for r in dataset] == ["water", "land", None]
    assert dataset.groups == ["land", "water"]
    assert [r.image_id for r in dataset] == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]
    assert dataset.root == tmp_path.resolve()


@pytest.mark.parametrize("bad_path", ["../outside.png", "%2e%2e%2foutside.png", "..\\outside.png",
                                      "%252e%252e%252foutside.png"])
def test_manifest_paths_are_confined(tmp_path, bad_path):
    _png(tmp_path / "outside.png")
    (tmp_path / "ds").mkdir()
    pd.DataFrame({"path": [bad_path], "label": ["x"]}).to_csv(tmp_path / "ds" / "m.csv", index=False)
    with pytest.raises(DataError, match="invalid path"):
        load_manifest(tmp_path / "ds" / "m.csv")


def test_manifest_errors(tmp_path):
    _png(tmp_path / "a.png")
    (tmp_path / "cols.csv").write_text("path,label,colour\na.png,x,red\n")
    with pytest.raises(DataError, match="unknown columns.*colour"):
        load_manifest(tmp_path / "cols.csv")
    (tmp_path / "nolabel.csv").write_text("path\na.png\n")
    with pytest.raises(DataError, match="missing columns.*label"):
        load_manifest(tmp_path / "nolabel.csv")
    (tmp_path / "gone.csv").write_text("path,label\na.png,x\nb.png,y\n")
    with pytest.raises(DataError, match="row 3.*b.png"):
        load_manifest(tmp_path / "gone.csv")
    (tmp_path / "blank.csv").write_text("path,label\na.png,\n")
    with pytest.raises(DataError, match="row 2: empty label"):
        load_manifest(tmp_path / "blank.csv")
    (tmp_path / "rows.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_manifest(tmp_path / "rows.csv")
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nothing.csv")
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DataError, match="data.json"):
        load_dataset(tmp_path / "data.json")


# --- concept examples -----------------------------------------------------------------------

def test_concept_examples_folder(tmp_path):
    _png(tmp_path / "stripes" / "positives" / "1.png")
    _png(tmp_path / "stripes" / "positives" / "2.png")
    _png(tmp_path / "stripes" / "negatives" / "3.png")
    _png(tmp_path / "red" / "positives" / "4.png")
    examples = load_concept_examples(tmp_path)
    assert isinstance(examples, ConceptExamples)
    assert examples.concepts == ["red", "stripes"] and len(examples) == 2
    positives, negatives = examples["stripes"]
    assert [p.name for p in positives] == ["1.png", "2.png"] and [p.name for p in negatives] == ["3.png"]
    assert examples["red"][1] == []
    assert dict(examples.items()).keys() == {"red", "stripes"}
    with pytest.raises(DataError, match="unknown concept 'blue'"):
        examples["blue"]


def test_concept_examples_errors(tmp_path):
    _png(tmp_path / "a" / "negatives" / "1.png")
    with pytest.raises(DataError, match="positives"):
        load_concept_examples(tmp_path)
    (tmp_path / "a" / "positives").mkdir()
    with pytest.raises(DataError, match="'a' has no positive examples"):
        load_concept_examples(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_concept_examples(tmp_path / "missing")


def test_attribute_table(tmp_path):
    for name in ("i/1.png", "i/2.png", "i/3.png"):
        _png(tmp_path / name)
    (tmp_path / "attrs.csv").write_text(
        "image,concept,present\ni/1.png,wing,1\ni/2.png,wing,0\ni/3.png,wing,1\ni/2.png,beak,1\n")
    examples = load_attribute_table(tmp_path / "attrs.csv")
    assert examples.concepts == ["beak", "wing"]
    positives, negatives = examples["wing"]
    assert [p.name for p in positives] == ["1.png", "3.png"] and [p.name for p in negatives] == ["2.png"]
    assert examples["beak"] == ([(tmp_path / "i" / "2.png").resolve()], [])


def test_attribute_table_errors(tmp_path):
    _png(tmp_path / "1.png")
    (tmp_path / "bad.csv").write_text("image,concept,present\n1.png,wing,2\n")
    with pytest.raises(DataError, match="row 2: present must be 0 or 1"):
        load_attribute_table(tmp_path / "bad.csv")
    (tmp_path / "esc.csv").write_text("image,concept,present\n../1.png,wing,1\n")
    with pytest.raises(DataError, match="invalid path"):
        load_attribute_table(tmp_path / "esc.csv")
    (tmp_path / "neg.csv").write_text("image,concept,present\n1.png,wing,0\n")
    with pytest.raises(DataError, match="'wing' has no positive examples"):
        load_attribute_table(tmp_path / "neg.csv")
