"""A content-addressed store of tensors: ``<root>/<aa>/<sha256>.safetensors``.

Files are written (atomically, via ``ml.store.save_tensors``) *before* the database
transaction that references them commits, so a committed row always finds its file.
A failed transaction can leave an unreferenced file behind; :func:`collect_garbage`
removes those once they are old enough that no transaction in flight can still want them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ml.errors import DataError
from ml.store import load_tensors, safe_join, save_tensors, tensors_sha256

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str  # ml.store.tensors_sha256 of the tensors
    key: str  # path relative to the store root, as kept in the database


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key_for(sha256: str) -> str:
        if not _HEX64.match(sha256):
            raise DataError(f"not an artifact hash: {sha256!r}")
        return f"{sha256[:2]}/{sha256}{_SUFFIX}"

    def path(self, key: str) -> Path:
        """The file of ``key``, confined under the root (keys come from the database, still checked)."""
        return safe_join(self.root, key)

    def put(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> StoredArtifact:
        """Store ``tensors`` under their content hash; storing the same content twice is a no-op."""
        if not tensors:
            raise DataError("refusing to store an empty set of tensors")
        sha = tensors_sha256(tensors)
        key = self.key_for(sha)
        target = self.path(key)
        if self._intact(target, sha):
            os.utime(target)  # a fresh mtime keeps the garbage collector off a file about to be referenced
        else:
            save_tensors(target, tensors, meta)
        return StoredArtifact(sha256=sha, key=key)

    def get(self, key: str, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Load an artifact; with ``expected_sha256``, refuse content that does not match it."""
        tensors, meta = load_tensors(self.path(key))
        if expected_sha256 is not None and tensors_sha256(tensors) != expected_sha256:
            raise DataError(f"artifact {key} is corrupt: its content does not match its hash")
        return tensors, meta

    def _intact(self, path: Path, sha: str) -> bool:
        if not path.is_file():
            return False
        try:
            tensors, _ = load_tensors(path)
        except DataError:
            return False  # torn or damaged: write it again
        return tensors_sha256(tensors) == sha

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in self.root.glob(f"??/*{_SUFFIX}"))

    def collect_garbage(self, referenced: Iterable[str], *, older_than_s: float = 3600.0) -> list[str]:
        """Delete files no row references and not modified for ``older_than_s``; returns their keys."""
        keep = set(referenced)
        cutoff = time.time() - older_than_s
        removed = []
        for key in self.keys():
            path = self.root / key
            if key not in keep and path.stat().st_mtime <= cutoff:
                path.unlink(missing_ok=True)
                removed.append(key)
        return removed
