"""A workspace: one directory holding a project's embeddings, concept banks and models.

The CLI writes workspaces and the web app serves them. ``workspace.json`` names every
artifact by a short name; artifacts are files under the workspace, never outside it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml.errors import ConfigError, DataError
from ml.store import atomic_write_bytes, safe_join

MANIFEST = "workspace.json"
_KINDS = ("datasets", "embeddings", "banks", "models")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def check_name(name: str, what: str = "name") -> str:
    """Artifact names become file names, so only a safe alphabet is allowed."""
    if not _NAME.match(name or "") or ".." in name:
        raise ConfigError(
            f"invalid {what} {name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


@dataclass
class Workspace:
    """The manifest of a workspace directory; see docs/design.md for the layout."""

    root: Path
    backbone: str | None = None
    datasets: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, str] = field(default_factory=dict)
    banks: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)
    default_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, root: str | os.PathLike, create: bool = False) -> Workspace:
        """Open the workspace at ``root``; with ``create``, make an empty one if absent."""
        path = Path(root).expanduser().resolve()
        manifest = path / MANIFEST
        if not manifest.is_file():
            if not create:
                raise DataError(f"no workspace at {path} (missing {MANIFEST}); create one with a `pcbm` command first")
            path.mkdir(parents=True, exist_ok=True)
            workspace = cls(root=path)
            workspace.save()
            return workspace
        try:
            data = json.loads(manifest.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{manifest} is not valid JSON: {exc}") from None
        known = {k: data.pop(k, {}) or {} for k in _KINDS}
        return cls(
            root=path,
            backbone=data.pop("backbone", None),
            default_model=data.pop("default_model", None),
            extra=data,
            **known,
        )

    def save(self) -> None:
        data = {
            "backbone": self.backbone,
            **{kind: getattr(self, kind) for kind in _KINDS},
            "default_model": self.default_model,
            **self.extra,
        }
        atomic_write_bytes(self.root / MANIFEST, json.dumps(data, indent=2, sort_keys=True).encode())

    def path_for(self, kind: str, name: str) -> Path:
        """The absolute path of a registered artifact, confined to the workspace."""
        registry: dict[str, str] = getattr(self, kind)
        if name not in registry:
            known = ", ".join(sorted(registry)) or "none yet"
            raise ConfigError(f"unknown {kind[:-1]} {name!r} in workspace {self.root} (known: {known})")
        return safe_join(self.root, registry[name])

    def new_path(self, kind: str, name: str, suffix: str = "") -> Path:
        """Where a new artifact of ``kind`` called ``name`` goes (not yet registered)."""
        check_name(name, kind[:-1] + " name")
        return safe_join(self.root, kind, name + suffix)

    def register(self, kind: str, name: str, path: Path) -> None:
        registry: dict[str, str] = getattr(self, kind)
        registry[check_name(name)] = str(Path(path).resolve().relative_to(self.root))
        self.save()

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache" / "embeddings"
