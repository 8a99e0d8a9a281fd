"""Artifacts on disk: safetensors + a JSON manifest, written atomically, never pickled.

Heavy arrays (embeddings, concept vectors, head weights) are stored with safetensors,
whose format holds raw tensors only, so loading an artifact can never run code. Small
structured data travels in the safetensors header's metadata as one JSON string.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ml.errors import DataError

_META_KEY = "pcbm_meta"


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(chunk_size), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    """Save named tensors plus JSON-serialisable ``meta`` to one safetensors file, atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(clean, tmp, metadata={_META_KEY: json.dumps(meta or {}, sort_keys=True)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`; returns ``(tensors, meta)``."""
    source = Path(path)
    if not source.is_file():
        raise DataError(f"artifact not found: {source}")
    try:
        tensors = load_file(str(source))
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{source} is not a valid safetensors artifact ({exc})") from None
    try:
        meta = json.loads(header.get(_META_KEY, "{}"))
    except json.JSONDecodeError:
        raise DataError(f"{source} has a corrupt metadata header") from None
    return tensors, meta


def load_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON ``meta`` of a :func:`save_tensors` file, without reading its tensors."""
    from safetensors import safe_open

    source = Path(path)
    try:
        # safe_open checks that the header covers the whole file, so a torn file fails here
        with safe_open(str(source), framework="pt") as handle:
            header = handle.metadata() or {}
        return json.loads(header.get(_META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"{source} is not a valid safetensors artifact ({exc})") from None


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors (names, dtypes, shapes and bytes), order-independent."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        # reshape first: a 0-d tensor cannot be viewed as bytes of another element size
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def safe_join(root: str | os.PathLike, *parts: str) -> Path:
    """Join user-given ``parts`` under ``root`` and refuse anything that escapes it.

    Percent-encoded and double-encoded separators and ``..`` are decoded before the
    check, and both ``/`` and ``\\`` count as separators, so ``..%252f`` is refused too.
    """
    base = Path(root).resolve()
    pieces: list[str] = []
    for part in parts:
        decoded = str(part)
        for _ in range(3):  # undo up to triple encoding; a real name never needs more
            nxt = unquote(decoded)
            if nxt == decoded:
                break
            decoded = nxt
        if "\x00" in decoded:
            raise DataError(f"invalid path {part!r}: contains a NUL byte")
        decoded = decoded.replace("\\", "/")
        if decoded.startswith("/") or (len(decoded) > 1 and decoded[1] == ":"):
            raise DataError(f"invalid path {part!r}: absolute paths are not allowed")
        if any(segment == ".." for segment in decoded.split("/")):
            raise DataError(f"invalid path {part!r}: '..' is not allowed")
        pieces.append(decoded)
    candidate = base.joinpath(*pieces).resolve()
    if candidate != base and base not in candidate.parents:
        raise DataError(f"invalid path {'/'.join(parts)!r}: it leaves {base}")
    return candidate


class EmbeddingCache:
    """Embeddings keyed by (backbone identity, image content hash), stored in shards.

    Each call to :meth:`put` writes one safetensors shard under ``root/<identity>/``, so an
    interrupted embedding run keeps every shard it finished. A different checkpoint or
    preprocessing gives a different identity and therefore never reads stale vectors.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._index: dict[str, dict[str, tuple[Path, int]]] = {}

    def _dir(self, identity: str) -> Path:
        if not identity or any(c not in "0123456789abcdef" for c in identity.lower()):
            raise DataError(f"backbone identity must be a hex digest, got {identity!r}")
        return self.root / identity

    def _load_index(self, identity: str) -> dict[str, tuple[Path, int]]:
        if identity not in self._index:
            index: dict[str, tuple[Path, int]] = {}
            directory = self._dir(identity)
            for shard in sorted(directory.glob("shard-*.safetensors")) if directory.is_dir() else []:
                try:
                    meta = load_meta(shard)  # header only: indexing must not read every vector
                except DataError:
                    continue  # a torn shard from a crash is ignored and recomputed
                for row, key in enumerate(meta.get("keys", [])):
                    index[key] = (shard, row)
            self._index[identity] = index
        return self._index[identity]

    def has(self, identity: str, content_hash: str) -> bool:
        return content_hash in self._load_index(identity)

    def missing(self, identity: str, content_hashes: list[str]) -> list[str]:
        index = self._load_index(identity)
        return [h for h in content_hashes if h not in index]

    def get(self, identity: str, content_hashes: list[str]) -> torch.Tensor:
        """Stack cached embeddings in the order given; raises if any is missing."""
        index = self._load_index(identity)
        absent = [h for h in content_hashes if h not in index]
        if absent:
            raise DataError(f"{len(absent)} embeddings are not in the cache (first: {absent[0][:12]})")
        by_shard: dict[Path, dict[str, torch.Tensor]] = {}
        rows = []
        for h in content_hashes:
            shard, row = index[h]
            if shard not in by_shard:
                by_shard[shard] = load_tensors(shard)[0]
            rows.append(by_shard[shard]["embeddings"][row])
        return torch.stack(rows) if rows else torch.empty(0)

    def put(self, identity: str, content_hashes: list[str], embeddings: torch.Tensor) -> None:
        if len(content_hashes) != embeddings.shape[0]:
            raise DataError("one content hash is needed per embedding row")
        if not torch.isfinite(embeddings).all():
            raise DataError("refusing to cache embeddings that contain NaN or Inf")
        directory = self._dir(identity)
        name = f"shard-{bytes_sha256(''.join(content_hashes).encode())[:16]}.safetensors"
        shard = directory / name
        save_tensors(shard, {"embeddings": embeddings.float()}, {"keys": list(content_hashes)})
        index = self._load_index(identity)
        for row, key in enumerate(content_hashes):
            index[key] = (shard, row)
