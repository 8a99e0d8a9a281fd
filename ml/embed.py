"""Batched, cached embedding of image datasets.

Images are keyed by the sha256 of their bytes, so an image already in the
:class:`~ml.store.EmbeddingCache` for this backbone is never decoded again, and each
finished batch is cached at once, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ml.data import ImageDataset, open_image
from ml.errors import DataError, ShapeError
from ml.store import EmbeddingCache, file_sha256, load_tensors, save_tensors

Progress = Callable[[int, int], None]
_KIND = "pcbm.embedded_dataset"


@dataclass
class EmbeddedDataset:
    embeddings: torch.Tensor  # (N, d) float32, raw backbone embeddings
    image_ids: list[str]  # ImageRecord.image_id (path relative to the dataset root)
    labels: torch.Tensor  # (N,) long, indices into classes
    classes: list[str]
    splits: list[str]  # per image
    groups: list[str | None]  # per image
    backbone_identity: str
    dataset_root: str

    def __post_init__(self):
        n = self.embeddings.shape[0] if self.embeddings.ndim == 2 else -1
        lengths = {len(self.image_ids), self.labels.shape[0], len(self.splits), len(self.groups)}
        if n < 0 or lengths != {n}:
            raise ShapeError(f"embedded dataset parts disagree: embeddings {tuple(self.embeddings.shape)}, "
                             f"{len(self.image_ids)} ids, {self.labels.shape[0]} labels, "
                             f"{len(self.splits)} splits, {len(self.groups)} groups")

    def __len__(self) -> int:
        return len(self.image_ids)

    def split(self, name: str) -> "EmbeddedDataset":
        """The rows of one split (same classes, same backbone)."""
        rows = [i for i, s in enumerate(self.splits) if s == name]
        if not rows:
            raise DataError(f"no split {name!r}; splits: {', '.join(dict.fromkeys(self.splits))}")
        index = torch.tensor(rows, dtype=torch.long)
        return EmbeddedDataset(self.embeddings[index], [self.image_ids[i] for i in rows], self.labels[index],
                               list(self.classes), [name] * len(rows), [self.groups[i] for i in rows],
                               self.backbone_identity, self.dataset_root)

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file (embeddings, labels) with everything else in its JSON header."""
        meta = {"kind": _KIND, "version": 1, "image_ids": self.image_ids, "classes": self.classes,
                "splits": self.splits, "groups": self.groups, "backbone_identity": self.backbone_identity,
                "dataset_root": self.dataset_root}
        save_tensors(path, {"embeddings": self.embeddings.float(), "labels": self.labels.long()}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddedDataset":
        tensors, meta = load_tensors(path)
        if meta.get("kind") != _KIND or not {"embeddings", "labels"} <= tensors.keys():
            raise DataError(f"{path} is not an embedded dataset")
        try:
            return cls(tensors["embeddings"], list(meta["image_ids"]), tensors["labels"], list(meta["classes"]),
                       list(meta["splits"]), list(meta["groups"]), str(meta["backbone_identity"]),
                       str(meta["dataset_root"]))
        except (KeyError, TypeError, ShapeError) as exc:
            raise DataError(f"{path} is a damaged embedded dataset ({exc})") from None


class _DecodedImages(Dataset):
    """Decode + preprocess, returning errors as values so workers never raise mid-batch."""

    def __init__(self, paths: list[Path], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.paths = paths
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(open_image(self.paths[i])), None
        except DataError as exc:
            return i, None, str(exc)


def _collate(items):
    errors = [error for _, _, error in items if error is not None]
    if errors:
        return [i for i, _, _ in items], None, errors[0]
    return [i for i, _, _ in items], torch.stack([x for _, x, _ in items]), None


def _check_finite(embeddings: torch.Tensor, names: Sequence[str]) -> None:
    bad = ~torch.isfinite(embeddings).all(dim=1)
    if bad.any():
        offenders = [name for name, b in zip(names, bad.tolist()) if b]
        raise DataError(f"the backbone produced NaN/Inf embeddings for {len(offenders)} image(s), "
                        f"first: {offenders[0]}")


def embed_paths(backbone, paths: Sequence[str | os.PathLike], cache: EmbeddingCache | None = None,
                batch_size: int = 64, num_workers: int = 0, progress: Progress | None = None) -> torch.Tensor:
    """Embed image files in order, reusing and filling ``cache``.

    Parameters
    ----------
    backbone : Backbone
    paths : sequence of paths
    cache : EmbeddingCache or None
        Cached images are not decoded; each computed batch is written as it finishes.
    batch_size, num_workers : int
        Images per forward pass; DataLoader worker processes for decoding.
    progress : callable(done, total) or None
        Called after every batch (and once if nothing was left to compute).

    Returns
    -------
    torch.Tensor
        (len(paths), d) float32 raw embeddings.
    """
    files = [Path(p) for p in paths]
    hashes = [file_sha256(p) for p in files]  # reads bytes only; DataError names an unreadable file
    first_path: dict[str, Path] = {}
    for h, f in zip(hashes, files):
        first_path.setdefault(h, f)  # identical bytes are decoded and embedded once
    counts = Counter(hashes)
    identity = backbone.identity
    todo = cache.missing(identity, list(first_path)) if cache is not None else list(first_path)
    total = len(files)
    done = total - sum(counts[h] for h in todo)
    vectors: dict[str, torch.Tensor] = {}
    if todo:
        cuda = torch.device(backbone.device).type == "cuda"
        loader = DataLoader(_DecodedImages([first_path[h] for h in todo], backbone.preprocess),
                            batch_size=max(1, int(batch_size)), num_workers=int(num_workers),
                            collate_fn=_collate, pin_memory=cuda)
        for indices, images, error in loader:
            if error is not None:
                raise DataError(error)
            keys = [todo[i] for i in indices]
            embeddings = backbone.encode_images(images)
            _check_finite(embeddings, [str(first_path[k]) for k in keys])
            if cache is not None:
                cache.put(identity, keys, embeddings)
            vectors.update(zip(keys, embeddings))
            done += sum(counts[k] for k in keys)
            if progress is not None:
                progress(done, total)
    elif progress is not None:
        progress(total, total)
    earlier = [h for h in first_path if h not in vectors]
    if earlier:
        vectors.update(zip(earlier, cache.get(identity, earlier)))
    if not hashes:
        return torch.empty(0, backbone.embed_dim)
    return torch.stack([vectors[h] for h in hashes]).float()


def embed_dataset(backbone, dataset: ImageDataset, cache: EmbeddingCache | None = None, batch_size: int = 64,
                  num_workers: int = 0, progress: Progress | None = None) -> EmbeddedDataset:
    """Embed every image of ``dataset`` (see :func:`embed_paths` for the parameters)."""
    if len(dataset) == 0:
        raise DataError(f"dataset {dataset.root} has no images to embed")
    embeddings = embed_paths(backbone, [r.path for r in dataset.records], cache=cache, batch_size=batch_size,
                             num_workers=num_workers, progress=progress)
    return EmbeddedDataset(embeddings, [r.image_id for r in dataset.records], dataset.labels_tensor(),
                           list(dataset.classes), [r.split for r in dataset.records],
                           [r.group for r in dataset.records], backbone.identity, str(dataset.root))


def embed_images(backbone, images: Sequence[Image.Image]) -> torch.Tensor:
    """Embed in-memory PIL images (no cache): (N,) -> (N, d) float32."""
    if len(images) == 0:
        return torch.empty(0, backbone.embed_dim)
    embeddings = backbone.encode_images(torch.stack([backbone.preprocess(image) for image in images]))
    _check_finite(embeddings, [f"image #{i}" for i in range(len(images))])
    return embeddings
