"""Batched, cached embedding of image datasets.

Images are keyed by the sha256 of their bytes, so an image already in the
:class:`~ml.store.EmbeddingCache` for this backbone is never decoded again, and each
finished batch is cached at once, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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

    def split(self, name: str) -> EmbeddedDataset:
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
    def load(cls, path: str | os.PathLike) -> EmbeddedDataset:
        tensors, meta = load_tensors(path)
        if meta.get("kind") != _KIND or not {"embeddings", "labels"} <= tensors.keys():
            raise DataError(f"{path} is not an embedded dataset")
        try:
            return cls(tensors["embeddings"], list(meta["image_ids"]), tensors["labels"], list(meta["classes"]),
                       list(meta["splits"]), list(meta["groups"]), str(meta["backbone_identity"]),
                       str(meta["dataset_root"]))
        except (KeyError, TypeError, ShapeError) as exc:
            raise DataError(f"{path} is a damaged embedded dataset ({exc})") from None


class _PixelStages:
    """A backbone's preprocessing split in two, so the decode workers do only the PIL part.

    open_clip's transform is ``[PIL resize/crop/convert stages] + ToTensor + Normalize``.
    Workers run the PIL stages and send uint8 (3, H, W) tensors (a quarter of the bytes of
    float32 through shared memory, pinned memory and the host-to-device copy); the main
    process (or the GPU) converts and normalises whole batches at once, with exactly the
    operations ToTensor and Normalize apply, so the pixels are bit-identical to
    ``backbone.preprocess``. Backbones whose transform has another shape keep the full
    ``preprocess`` in the workers (:func:`_pixel_stages` returns None).
    """

    def __init__(self, pil: Callable[[Image.Image], Image.Image], mean: Sequence[float], std: Sequence[float]):
        self.pil = pil
        self.mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        out = self.pil(image)
        if not isinstance(out, Image.Image) or out.mode != "RGB":
            raise DataError(f"preprocessing gave {type(out).__name__} {getattr(out, 'mode', '')}, not an RGB image")
        return torch.from_numpy(np.array(out, np.uint8, copy=True)).permute(2, 0, 1).contiguous()

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> float32, as ToTensor (``/ 255``) then Normalize (``(x - mean) / std``)."""
        x = batch.to(dtype=torch.float32).div(255)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))


def _pixel_stages(backbone) -> _PixelStages | None:
    module = sys.modules.get("ml.backbone")
    if module is None or type(backbone) is not module.OpenClipBackbone or "preprocess" in vars(backbone):
        return None  # only OpenClipBackbone.preprocess is known to be transform(image.convert("RGB"))
    from torchvision import transforms as T

    to_tensor = {T.ToTensor, getattr(sys.modules.get("open_clip.transform"), "MaybeToTensor", T.ToTensor)}
    steps = list(getattr(getattr(backbone, "transform", None), "transforms", None) or [])
    if len(steps) < 2 or type(steps[-2]) not in to_tensor or type(steps[-1]) is not T.Normalize \
            or any(type(step) in to_tensor or isinstance(step, T.Normalize) for step in steps[:-2]):
        return None
    return _PixelStages(T.Compose([_to_rgb, *steps[:-2]]), steps[-1].mean, steps[-1].std)


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


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
        offenders = [name for name, b in zip(names, bad.tolist(), strict=False) if b]
        raise DataError(f"the backbone produced NaN/Inf embeddings for {len(offenders)} image(s), "
                        f"first: {offenders[0]}")


class _ShardWriter:
    """Writes cache shards on a background thread, so the next forward pass starts at once.

    At most ``depth`` batches wait; :meth:`close` (always called, also on errors and
    interrupts) writes what is queued and re-raises a failed write.
    """

    def __init__(self, cache: EmbeddingCache, identity: str, depth: int = 2):
        self.cache, self.identity = cache, identity
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pcbm-embed-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.cache.put(self.identity, *job)
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = exc

    def put(self, keys: list[str], embeddings: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((keys, embeddings))

    def close(self, raise_error: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        if raise_error and self._error is not None:
            raise self._error


def auto_workers(n_images: int, batch_size: int, device: torch.device | str) -> int:
    """Decode worker processes when the caller does not say: none for a few batches (a worker
    costs a process start), one on a CPU backbone (the forward pass needs the other cores,
    and decoding costs a few percent of it), up to 8 feeding a GPU (there decoding is the
    bottleneck)."""
    if n_images < 4 * max(1, batch_size) or n_images < 256:
        return 0
    cores = os.cpu_count() or 1
    if torch.device(device).type == "cuda":
        return max(1, min(8, cores - 1))
    return 1 if cores > 1 else 0


def _batches(n: int, batch_size: int, ramp: bool) -> list[list[int]]:
    """Index batches; with ``ramp`` the first is a quarter of the size (but at least 16, which
    keeps the forward pass efficient), so the forward pass starts once a few images are
    decoded instead of waiting for a whole batch."""
    first = min(batch_size, max(16, batch_size // 4)) if ramp else batch_size
    starts = [0, *range(min(first, n), n, batch_size)] if n else []
    return [list(range(a, min(b, n))) for a, b in zip(starts, [*starts[1:], n], strict=False)]


def _hash_files(files: list[Path]) -> list[str]:
    if len(files) < 64:
        return [file_sha256(p) for p in files]
    with ThreadPoolExecutor(max_workers=4) as pool:  # reading and sha256 release the GIL
        return list(pool.map(file_sha256, files))


def embed_paths(backbone, paths: Sequence[str | os.PathLike], cache: EmbeddingCache | None = None,
                batch_size: int = 64, num_workers: int | None = 0, progress: Progress | None = None,
                prefetch_batches: int = 4) -> torch.Tensor:
    """Embed image files in order, reusing and filling ``cache``.

    The pipeline: files are hashed (bytes only) and those already cached are never
    decoded; ``num_workers`` processes decode and resize the rest (uint8 out, see
    :class:`_PixelStages`), ``prefetch_batches`` batches ahead of the forward pass, so
    decoding overlaps it; batches are pinned and copied without blocking on CUDA, where the
    backbone runs under bf16 autocast; each finished batch is cached by a background writer
    while the next one runs, so an interrupted run keeps every shard it finished.

    Parameters
    ----------
    backbone : Backbone
    paths : sequence of paths
    cache : EmbeddingCache or None
        Cached images are not decoded; each computed batch is written as it finishes.
    batch_size : int
        Images per forward pass.
    num_workers : int or None
        Decoding worker processes (0: decode in this process); None picks
        :func:`auto_workers`.
    progress : callable(done, total) or None
        Called after every batch (and once if nothing was left to compute).
    prefetch_batches : int
        Batches decoded ahead of the forward pass, in all (with workers).

    Returns
    -------
    torch.Tensor
        (len(paths), d) float32 raw embeddings.
    """
    files = [Path(p) for p in paths]
    hashes = _hash_files(files)  # reads bytes only; DataError names an unreadable file
    first_path: dict[str, Path] = {}
    for h, f in zip(hashes, files, strict=False):
        first_path.setdefault(h, f)  # identical bytes are decoded and embedded once
    counts = Counter(hashes)
    identity = backbone.identity
    todo = cache.missing(identity, list(first_path)) if cache is not None else list(first_path)
    total = len(files)
    done = total - sum(counts[h] for h in todo)
    vectors: dict[str, torch.Tensor] = {}
    if todo:
        device = torch.device(backbone.device)
        batch_size = max(1, int(batch_size))
        workers = auto_workers(len(todo), batch_size, device) if num_workers is None else int(num_workers)
        stages = _pixel_stages(backbone)
        loader = DataLoader(_DecodedImages([first_path[h] for h in todo],
                                           stages.to_uint8 if stages is not None else backbone.preprocess),
                            batch_sampler=_batches(len(todo), batch_size, ramp=workers > 0), num_workers=workers,
                            collate_fn=_collate, pin_memory=device.type == "cuda",
                            prefetch_factor=max(1, -(-int(prefetch_batches) // workers)) if workers else None)
        writer = _ShardWriter(cache, identity) if cache is not None else None
        try:
            for indices, images, error in loader:
                if error is not None:
                    raise DataError(error)
                keys = [todo[i] for i in indices]
                if stages is not None:
                    images = stages.normalise(images.to(device, non_blocking=True))
                embeddings = backbone.encode_images(images)
                _check_finite(embeddings, [str(first_path[k]) for k in keys])
                if writer is not None:
                    writer.put(keys, embeddings)
                vectors.update(zip(keys, embeddings, strict=False))
                done += sum(counts[k] for k in keys)
                if progress is not None:
                    progress(done, total)
        except BaseException:
            if writer is not None:
                writer.close(raise_error=False)  # keep what finished; the first error is the one to see
            raise
        if writer is not None:
            writer.close()
    elif progress is not None:
        progress(total, total)
    earlier = [h for h in first_path if h not in vectors]
    if earlier:
        vectors.update(zip(earlier, cache.get(identity, earlier), strict=False))
    if not hashes:
        return torch.empty(0, backbone.embed_dim)
    return torch.stack([vectors[h] for h in hashes]).float()


def embed_dataset(backbone, dataset: ImageDataset, cache: EmbeddingCache | None = None, batch_size: int = 64,
                  num_workers: int | None = 0, progress: Progress | None = None) -> EmbeddedDataset:
    """Embed every image of ``dataset`` (see :func:`embed_paths` for the parameters)."""
    if len(dataset) == 0:
        raise DataError(f"dataset {dataset.root} has no images to embed")
    embeddings = embed_paths(backbone, [r.path for r in dataset.records], cache=cache, batch_size=batch_size,
                             num_workers=num_workers, progress=progress)
    return EmbeddedDataset(embeddings, [r.image_id for r in dataset.records], dataset.labels_tensor(),
                           list(dataset.classes), [r.split for r in dataset.records],
                           [r.group for r in dataset.records], backbone.identity, str(dataset.root))


def embed_pixels(backbone, pixels: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Embed preprocessed pixels, (N, 3, H, W) -> (N, d) float32; NaN/Inf refused unless ``check`` is False."""
    if pixels.shape[0] == 0:
        return torch.empty(0, backbone.embed_dim)
    embeddings = backbone.encode_images(pixels)
    if check:
        _check_finite(embeddings, [f"image #{i}" for i in range(len(embeddings))])
    return embeddings


def embed_images(backbone, images: Sequence[Image.Image]) -> torch.Tensor:
    """Embed in-memory PIL images (no cache): (N,) -> (N, d) float32."""
    if len(images) == 0:
        return torch.empty(0, backbone.embed_dim)
    return embed_pixels(backbone, torch.stack([backbone.preprocess(image) for image in images]))
