"""Labelled image datasets and concept examples on disk, and safe image decoding.

Layouts read here:

- ImageFolder: ``root/<class>/<image>``; or ``root/<split>/<class>/<image>`` when *every*
  top-level folder is a split name (train, val, test and the aliases in ``SPLIT_ALIASES``)
  and each of them holds folders rather than images. Aliases are mapped to train/val/test.
- Manifest (CSV or Parquet): columns ``path,label[,split][,group]``; paths are relative to
  the manifest's folder and may not leave it.
- Concept examples: ``root/<concept>/positives/*`` and optionally ``root/<concept>/negatives/*``.
- Attribute table (CSV or Parquet): ``image,concept,present`` with present in {0, 1}.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

from ml.errors import DataError
from ml.store import safe_join

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # Pillow decoders we allow, nothing exotic
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000; larger inputs are almost surely bombs
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test", "holdout": "test"}
MANIFEST_COLUMNS = ("path", "label", "split", "group")


def open_image(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file or bytes into an RGB PIL image, safely.

    Parameters
    ----------
    source : path or bytes
    max_pixels : int
        Images with more pixels are refused before they are decoded.

    Raises
    ------
    DataError
        Missing, unreadable, truncated, oversized or not one of ``IMAGE_FORMATS``.
    """
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise DataError(f"image not found: {name}")
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            # our own max_pixels check replaces Pillow's warning; its hard limit still raises
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream, formats=list(IMAGE_FORMATS)) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DataError(f"image {name} is {width}x{height} pixels, over the limit of {max_pixels}")
                image.seek(0)  # first frame of an animation
                image.load()
                return ImageOps.exif_transpose(image).convert("RGB")
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"image {name} is too large to decode safely (decompression bomb)") from None
    except Image.UnidentifiedImageError:
        raise DataError(f"{name} is not an image in an allowed format ({', '.join(IMAGE_FORMATS)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow signals corrupt data variously
        raise DataError(f"cannot decode image {name}: {exc}") from None


@dataclass(frozen=True)
class ImageRecord:
    path: Path  # absolute path of the image file
    label: str  # class name
    split: str = "train"  # train / val / test / any other name
    group: str | None = None  # e.g. a spurious attribute for worst-group accuracy
    image_id: str = ""  # path relative to the dataset root, POSIX separators


class ImageDataset:
    """Records plus a fixed class order; ``classes`` is sorted unless given."""

    def __init__(self, records: list[ImageRecord], root: str | os.PathLike, classes: list[str] | None = None):
        self.records = list(records)
        self.root = Path(root)
        self.classes = list(classes) if classes is not None else sorted({r.label for r in self.records})
        self._index = {name: i for i, name in enumerate(self.classes)}
        unknown = sorted({r.label for r in self.records} - set(self._index))
        if unknown:
            raise DataError(f"labels not among the given classes {self.classes}: {', '.join(unknown[:10])}")

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    @property
    def splits(self) -> list[str]:
        """Split names in order of first appearance."""
        return list(dict.fromkeys(r.split for r in self.records))

    @property
    def groups(self) -> list[str]:
        return sorted({r.group for r in self.records if r.group is not None})

    def split(self, name: str) -> ImageDataset:
        """The records of one split, with the same class order."""
        if name not in self.splits:
            raise DataError(f"no split {name!r} in {self.root}; splits: {', '.join(self.splits)}")
        return ImageDataset([r for r in self.records if r.split == name], self.root, self.classes)

    def labels_tensor(self) -> torch.Tensor:
        return torch.tensor([self._index[r.label] for r in self.records], dtype=torch.long)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _finish(records: list[ImageRecord], root: Path, classes: list[str] | None, where: str) -> ImageDataset:
    if not records:
        raise DataError(f"no images found in {where}")
    dataset = ImageDataset(records, root, classes)  # first: an unexpected label is the likelier mistake
    if classes is not None:
        present = {r.label for r in records}
        empty = [c for c in classes if c not in present]
        if empty:
            raise DataError(f"class {empty[0]!r} has no images in {where}"
                            + (f" (nor do {len(empty) - 1} more)" if len(empty) > 1 else ""))
    return dataset


def load_image_folder(root: str | os.PathLike, classes: list[str] | None = None) -> ImageDataset:
    """Read ``root/<class>/<image>`` or ``root/<split>/<class>/<image>`` (see module docstring)."""
    base = Path(root).resolve()
    if not base.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    top = _subdirs(base)
    split_layout = bool(top) and all(d.name.lower() in SPLIT_ALIASES and _subdirs(d) for d in top)
    layout = [(SPLIT_ALIASES[d.name.lower()], d) for d in top] if split_layout else [("train", base)]
    records = []
    for split, folder in layout:
        for class_dir in _subdirs(folder):
            for path in _images_under(class_dir):
                records.append(ImageRecord(path, class_dir.name, split, None, path.relative_to(base).as_posix()))
    return _finish(records, base, classes, f"{root} (expected {root}/<class>/<image>)")


def _read_table(path: Path, required: tuple[str, ...], optional: tuple[str, ...]):
    import pandas as pd  # pandas is heavy; only tables need it

    if not path.is_file():
        raise DataError(f"table not found: {path}")
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif path.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise DataError(f"{path} must be a .csv or .parquet file")
    except (ValueError, OSError, pd.errors.ParserError, ImportError) as exc:
        raise DataError(f"cannot read table {path}: {exc}") from None
    columns = [str(c).strip() for c in frame.columns]
    frame.columns = columns
    unknown = [c for c in columns if c not in required + optional]
    missing = [c for c in required if c not in columns]
    if unknown or missing:
        problem = f"unknown columns {unknown}" if unknown else f"missing columns {missing}"
        raise DataError(f"{path}: {problem}; expected {','.join(required)}"
                        + "".join(f"[,{c}]" for c in optional))
    if frame.empty:
        raise DataError(f"{path} has no rows")
    return frame


def _cell(value) -> str:
    """A table cell as text; empty for missing values of any kind."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _confined_file(root: Path, relative: str, table: Path, row: int) -> Path:
    if not relative:
        raise DataError(f"{table}, row {row}: empty path")
    path = safe_join(root, relative)
    if not path.is_file():
        raise DataError(f"{table}, row {row}: file not found: {relative}")
    return path


def load_manifest(path: str | os.PathLike, classes: list[str] | None = None) -> ImageDataset:
    """Read a CSV/Parquet manifest with columns ``path,label[,split][,group]``."""
    table = Path(path).resolve()
    frame = _read_table(table, ("path", "label"), ("split", "group"))
    root = table.parent
    records = []
    for row, item in enumerate(frame.to_dict("records"), start=2):  # row 1 is the header
        file = _confined_file(root, _cell(item["path"]), table, row)
        label = _cell(item["label"])
        if not label:
            raise DataError(f"{table}, row {row}: empty label")
        split = _cell(item.get("split")) or "train"
        group = _cell(item.get("group")) or None
        records.append(ImageRecord(file, label, split, group, file.relative_to(root).as_posix()))
    return _finish(records, root, classes, str(table))


def load_dataset(path: str | os.PathLike, classes: list[str] | None = None) -> ImageDataset:
    """A folder (ImageFolder layout) or a manifest file (.csv, .parquet)."""
    source = Path(path)
    if source.is_dir():
        return load_image_folder(source, classes)
    if source.suffix.lower() in (".csv", ".parquet", ".pq"):
        return load_manifest(source, classes)
    if not source.exists():
        raise DataError(f"dataset not found: {source}")
    raise DataError(f"cannot read a dataset from {source}: give a folder or a .csv/.parquet manifest")


class ConceptExamples(Mapping):
    """concept -> (positive image paths, negative image paths), concepts sorted.

    A concept may have no negatives; a learner can then draw them from other concepts.
    """

    def __init__(self, examples: dict[str, tuple[list[Path], list[Path]]], root: str | os.PathLike):
        self.root = Path(root)
        self._examples = {c: (list(examples[c][0]), list(examples[c][1])) for c in sorted(examples)}
        empty = [c for c, (pos, _) in self._examples.items() if not pos]
        if empty:
            raise DataError(f"concept {empty[0]!r} has no positive examples in {self.root}")
        if not self._examples:
            raise DataError(f"no concepts found in {self.root}")

    def __getitem__(self, concept: str) -> tuple[list[Path], list[Path]]:
        if concept not in self._examples:
            raise DataError(f"unknown concept {concept!r}; known: {', '.join(list(self._examples)[:10])}")
        return self._examples[concept]

    def __iter__(self) -> Iterator[str]:
        return iter(self._examples)

    def __len__(self) -> int:
        return len(self._examples)

    @property
    def concepts(self) -> list[str]:
        return list(self._examples)


def load_concept_examples(root: str | os.PathLike) -> ConceptExamples:
    """Read ``root/<concept>/positives/*`` and ``root/<concept>/negatives/*``."""
    base = Path(root).resolve()
    if not base.is_dir():
        raise DataError(f"concept examples folder not found: {root}")
    examples = {}
    for concept_dir in _subdirs(base):
        positives = concept_dir / "positives"
        if not positives.is_dir():
            raise DataError(f"{concept_dir} has no 'positives' folder (expected <concept>/positives/*)")
        negatives = concept_dir / "negatives"
        examples[concept_dir.name] = (_images_under(positives), _images_under(negatives) if negatives.is_dir() else [])
    return ConceptExamples(examples, base)


def load_attribute_table(path: str | os.PathLike) -> ConceptExamples:
    """Read ``image,concept,present`` rows: present 1 -> positive, 0 -> negative."""
    table = Path(path).resolve()
    frame = _read_table(table, ("image", "concept", "present"), ())
    root = table.parent
    examples: dict[str, tuple[list[Path], list[Path]]] = {}
    for row, item in enumerate(frame.to_dict("records"), start=2):
        concept, present = _cell(item["concept"]), _cell(item["present"])
        if not concept:
            raise DataError(f"{table}, row {row}: empty concept")
        if present not in ("0", "1", "0.0", "1.0", "True", "False"):
            raise DataError(f"{table}, row {row}: present must be 0 or 1, got {present!r}")
        file = _confined_file(root, _cell(item["image"]), table, row)
        positives, negatives = examples.setdefault(concept, ([], []))
        (positives if present in ("1", "1.0", "True") else negatives).append(file)
    return ConceptExamples(examples, root)
