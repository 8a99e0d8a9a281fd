"""Registering a workspace's models in the database, so the app can serve and version them.

For every model of a workspace (``workspace.json``), :func:`import_workspace` registers
its backbone, its dataset (the embedded dataset the model was trained on), its concept
bank with every concept, and the model with version 1 = the saved head and metrics on
every split. The dataset row's ``info`` records the workspace, the embedded dataset and,
under ``"models"``, each imported model's file (workspace-relative path + sha256): that
is how the model service finds them (no schema change needed).

It is idempotent: a model is matched by workspace, workspace-relative path and the
content hash of its file, so importing the same workspace again creates nothing. A
changed model file is a new model (named ``<name>-<hash prefix>``); the old one keeps its
history but can no longer be served until its file is back.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import session_scope, write_transaction
from app.errors import AppError
from app.models import ConceptBank as BankRow
from app.models import Dataset, Model, User
from app.services import catalog, history
from app.services.head_editing import HeadState
from app.services.model_service import ORIGINS
from ml.errors import ConfigError, DataError, PCBMError

log = logging.getLogger(__name__)

_NAME_LIMIT = 64  # length of the name columns


def _relative(root: Path, path: Path | str) -> str:
    """``path`` relative to ``root`` when it lies inside it (as POSIX text), else absolute."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(root).as_posix()
    except ValueError:
        return str(resolved)


def _name_for(base: str, content_hash: str, taken: bool) -> str:
    if not taken:
        return base[:_NAME_LIMIT]
    return f"{base[:_NAME_LIMIT - 9]}-{content_hash[:8]}"


def _bank_hash(bank: Any) -> str:
    from ml.store import bytes_sha256, tensors_sha256

    tensors = tensors_sha256({"vectors": bank.vectors, "intercepts": bank.intercepts})
    return bytes_sha256(json.dumps({"tensors": tensors, "names": bank.names}).encode())


def _concept_rows(bank: Any) -> list[dict[str, Any]]:
    """The bank's concepts as the database stores them (info made plain JSON)."""
    return [{"name": n, "source": s, "info": json.loads(json.dumps(i or {}))}
            for n, s, i in zip(bank.names, bank.sources, bank.info, strict=True)]


class _Importer:
    def __init__(self, session: Session, artifacts: Any, workspace_dir: Any, author: User | None):
        from ml.workspace import Workspace

        self.session = session
        self.artifacts = artifacts
        self.author = author
        self.workspace = Workspace.open(workspace_dir)
        self.root = self.workspace.root
        self._metas: dict[str, dict[str, Any]] = {}
        self._embedded: dict[str, tuple[Any, str]] = {}
        self._banks: dict[str, tuple[str, str]] | None = None  # bank hash -> (name, relative path)

    # -- embedded datasets -----------------------------------------------------------------------
    def _embeddings_for(self, model_name: str, model: Any) -> str:
        """The name of the workspace's embedded dataset this model belongs to (same classes, backbone)."""
        from ml.store import load_meta

        bank = model.bank
        matches = []
        for name in sorted(self.workspace.embeddings):
            if name not in self._metas:
                self._metas[name] = load_meta(self.workspace.path_for("embeddings", name))
            meta = self._metas[name]
            identity = str(meta.get("backbone_identity") or "")
            same_backbone = not bank.backbone_identity or not identity or identity == bank.backbone_identity
            if list(meta.get("classes") or []) == list(model.classes_) and same_backbone:
                matches.append(name)
        if not matches:
            raise DataError(f"model {model_name!r} of workspace {self.root}: no embedded dataset has its classes "
                            f"({', '.join(model.classes_[:10])}) and backbone; embed its dataset first")
        if len(matches) > 1:
            log.warning("model %s fits several embedded datasets (%s); using %s", model_name, matches, matches[0])
        return matches[0]

    def _load_embedded(self, name: str) -> tuple[Any, str]:
        from ml.embed import EmbeddedDataset
        from ml.store import file_sha256

        if name not in self._embedded:
            path = self.workspace.path_for("embeddings", name)
            self._embedded[name] = (EmbeddedDataset.load(path), file_sha256(path))
        return self._embedded[name]

    def _dataset(self, name: str, embedded: Any, sha: str) -> Dataset:
        relative = _relative(self.root, self.workspace.path_for("embeddings", name))
        wanted = {"workspace": str(self.root), "embeddings": relative, "embeddings_sha256": sha}
        for candidate in (name[:_NAME_LIMIT], _name_for(name, sha, True)):
            row = self.session.scalar(select(Dataset).where(Dataset.name == candidate))
            if row is None:
                return self._create_dataset(candidate, embedded, wanted)
            if all((row.info or {}).get(k) == v for k, v in wanted.items()):
                return row
        raise DataError(f"cannot register embedded dataset {name!r}: the names {name!r} and "
                        f"{_name_for(name, sha, True)!r} are taken by other datasets")

    def _create_dataset(self, name: str, embedded: Any, wanted: dict[str, str]) -> Dataset:
        source = self.workspace.datasets.get(name) or embedded.dataset_root
        counts: dict[str, dict[str, int]] = {}
        for split, label in zip(embedded.splits, embedded.labels.tolist(), strict=True):
            per_class = counts.setdefault(split, {})
            per_class[embedded.classes[label]] = per_class.get(embedded.classes[label], 0) + 1
        info = {
            **wanted,
            "root": str(embedded.dataset_root),
            "backbone_identity": embedded.backbone_identity,
            "n_images": len(embedded),
            "splits": dict(sorted(Counter(embedded.splits).items())),
            "groups": dict(sorted(Counter(g for g in embedded.groups if g is not None).items())),
            "counts": counts,
        }
        return catalog.create_dataset(self.session, name, source=_relative(self.root, source),
                                      classes=list(embedded.classes), info=info, actor=self.author)

    # -- concept banks ---------------------------------------------------------------------------
    def _workspace_banks(self) -> dict[str, tuple[str, str]]:
        from ml.concepts import ConceptBank

        if self._banks is None:
            self._banks = {}
            for name in sorted(self.workspace.banks):
                path = self.workspace.path_for("banks", name)
                try:
                    bank = ConceptBank.load(path)
                except PCBMError as exc:
                    log.warning("skipping concept bank %s of %s: %s", name, self.root, exc)
                    continue
                self._banks.setdefault(_bank_hash(bank), (name, _relative(self.root, path)))
        return self._banks

    def _bank(self, model_name: str, model_dir: str, bank: Any, backbone_id: int) -> BankRow:
        """The bank row of a model's concept bank, named after the workspace bank with the same
        content if there is one. An existing row is reused when it holds exactly these concepts
        (names, sources and info) from the same place; the vectors always come from the model file."""
        content = _bank_hash(bank)
        name, source = self._workspace_banks().get(content, (f"{model_name}-bank", model_dir))
        concepts = _concept_rows(bank)
        for candidate in (name[:_NAME_LIMIT], _name_for(name, content, True)):
            row = self.session.scalar(select(BankRow).where(BankRow.name == candidate))
            if row is None:
                return catalog.create_concept_bank(self.session, candidate, backbone_id=backbone_id,
                                                   concepts=concepts, source=source, actor=self.author)
            stored = [{"name": c.name, "source": c.source, "info": c.info or {}} for c in row.concepts]
            if row.source == source and row.backbone_id == backbone_id and stored == concepts:
                return row
        raise DataError(f"cannot register the concept bank of model {model_name!r}: the names "
                        f"{name!r} and {_name_for(name, content, True)!r} are taken by other banks")

    # -- models ----------------------------------------------------------------------------------
    def _record_origin(self, dataset_id: int, model_id: int, entry: dict[str, str]) -> None:
        """Note in the dataset row where model ``model_id``'s file is (read-modify-write, one transaction)."""
        with write_transaction(self.session):
            info = dict(self.session.scalar(select(Dataset.info).where(Dataset.id == dataset_id)) or {})
            info[ORIGINS] = {**(info.get(ORIGINS) or {}), str(model_id): entry}
            self.session.execute(update(Dataset).where(Dataset.id == dataset_id).values(info=info)
                                 .execution_options(synchronize_session=False))

    def _existing(self, entry: dict[str, str], head: HeadState, base_name: str) -> int | None:
        """The id of the model already imported from this file, if any."""
        from ml.store import tensors_sha256

        # column queries, not ORM objects: the identity map may hold rows from before an update
        origins = {dataset_id: (info or {}).get(ORIGINS) or {}
                   for dataset_id, info in self.session.execute(select(Dataset.id, Dataset.info))
                   if (info or {}).get("workspace") == str(self.root)}
        for recorded in origins.values():
            for model_id, where in recorded.items():
                if where == entry and self.session.get(Model, int(model_id)) is not None:
                    return int(model_id)
        # an import that stopped between creating the model and recording where its file is
        orphan = self.session.execute(select(Model.id, Model.dataset_id).where(
            Model.name == base_name[:_NAME_LIMIT])).first()
        if orphan is not None and orphan.dataset_id in origins and str(orphan.id) not in origins[orphan.dataset_id]:
            if history.get_version(self.session, orphan.id, 1).weights_hash == tensors_sha256(head.tensors):
                self._record_origin(orphan.dataset_id, orphan.id, entry)
                return orphan.id
        return None

    def import_model(self, model_name: str) -> int:
        from ml.backbone import parse_backbone_spec
        from ml.pcbm import MODEL_FILE, PCBMHybrid, load_model
        from ml.store import bytes_sha256, file_sha256
        from ml.workflows import split_reports

        directory = self.workspace.path_for("models", model_name)
        file = directory / MODEL_FILE if directory.is_dir() else directory
        relative = _relative(self.root, directory)
        entry = {"path": relative, "sha256": file_sha256(file)}
        model = load_model(directory)
        tensors, config = model.head.state_dict()
        head = HeadState(tensors=tensors, config=config)
        existing = self._existing(entry, head, model_name)
        if existing is not None:
            return existing
        spec = self.workspace.backbone
        if not spec:
            raise ConfigError(f"workspace {self.root} names no backbone; its models cannot be served")
        parse_backbone_spec(spec)  # refuse a malformed spec now rather than at the first upload
        embeddings_name = self._embeddings_for(model_name, model)
        embedded, embeddings_sha = self._load_embedded(embeddings_name)
        identity = embedded.backbone_identity or model.bank.backbone_identity or bytes_sha256(spec.encode())
        backbone = catalog.get_or_create_backbone(self.session, spec, identity, embed_dim=int(model.bank.dim))
        dataset = self._dataset(embeddings_name, embedded, embeddings_sha)
        bank = self._bank(model_name, relative, model.bank, backbone.id)
        taken = self.session.scalar(select(Model.id).where(Model.name == model_name[:_NAME_LIMIT])) is not None
        created = history.create_model(
            self.session, self.artifacts, name=_name_for(model_name, entry["sha256"], taken),
            kind="pcbm_h" if isinstance(model, PCBMHybrid) else "pcbm", dataset_id=dataset.id,
            backbone_id=backbone.id, bank_id=bank.id, head=head, author=self.author,
            message=f"imported from {self.root / relative}", metrics=split_reports(model, embedded),
        )
        self._record_origin(dataset.id, created.id, entry)
        return created.id


def import_workspace(session: Session, ctx: Any, workspace_dir: str | Path, author: User | None = None) -> list[int]:
    """Register every model of the workspace at ``workspace_dir``; returns their ids (new or not).

    Parameters
    ----------
    session : a database session (each registration is its own transaction).
    ctx : the app context (its artifact store receives version 1 of each head).
    workspace_dir : a directory holding ``workspace.json``.
    author : who imports (``None``: the system, e.g. at server start).

    Raises
    ------
    ml.errors.DataError / ConfigError
        No workspace there, a model without a matching embedded dataset, unreadable files.
    """
    importer = _Importer(session, ctx.artifacts, workspace_dir, author)
    return [importer.import_model(name) for name in sorted(importer.workspace.models)]


def import_model(session: Session, ctx: Any, workspace_dir: str | Path, name: str, author: User | None = None) -> int:
    """Register the workspace's model ``name`` (idempotent: an imported file keeps its id)."""
    return _Importer(session, ctx.artifacts, workspace_dir, author).import_model(name)


def needs_loading(ctx: Any) -> bool:
    """Whether :func:`import_and_load` has anything to do: a workspace to import, or imported
    models to load. When not, the app is ready at once."""
    from sqlalchemy.exc import SQLAlchemyError

    from ml.workspace import MANIFEST

    if (Path(ctx.settings.workspace) / MANIFEST).is_file():
        return True
    models = getattr(ctx, "models", None)
    if models is None:
        return False
    try:
        return bool(models.imported_model_ids())
    except SQLAlchemyError:
        return True  # let the loader thread meet (and report) the database problem


def import_and_load(ctx: Any) -> None:
    """``create_app``'s default model loader: import the served workspace if it has a
    ``workspace.json``, then load every imported model into the model service.

    An import that fails is logged and leaves the database as it was for that model; the
    models that are registered are still loaded.
    """
    from ml.workspace import MANIFEST

    if (Path(ctx.settings.workspace) / MANIFEST).is_file():
        try:
            with session_scope(ctx.session_factory) as session:
                ids = import_workspace(session, ctx, ctx.settings.workspace, author=None)
            log.info("workspace %s: %d model(s) registered", ctx.settings.workspace, len(ids))
        except (AppError, PCBMError, OSError) as exc:
            log.error("cannot import workspace %s: %s", ctx.settings.workspace, getattr(exc, "message", exc))
    models = getattr(ctx, "models", None)
    if models is not None:
        models.load_all()
