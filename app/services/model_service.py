"""The process-wide model service: loaded heads and cached evaluation splits, on one device.

For every imported model (:mod:`app.services.workspace_import` records where its file is
in its dataset row, see :func:`model_origin`) it keeps the PCBM with the *current* head
version's weights and, per split of the model's embedded dataset, an
:class:`ml.evaluation.EvalCache` (standardised concept scores and logits) on the
configured device, so previews and browsing are a few tensor operations. Entries are evicted least-recently-used under ``model_memory_budget_mb``.
Every :meth:`ModelService.get` compares the entry with the head in the database, so a
commit, undo or revert (from this process or another) is served on the next request:
only the head is swapped, the cached concept scores are kept. Backbones load lazily,
shared by spec, and only inference (uploads, maps) needs them.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.errors import AppError, Conflict
from app.models import Backbone, Dataset, Model, ModelVersion
from app.services import history
from app.services.artifacts import ArtifactStore
from app.services.batcher import MicroBatcher
from app.services.head_editing import EditOutcome, HeadState, ModelInfo, TensorHeadEditor
from app.services.limits import ConcurrencyLimit
from app.services.ml_editing import MlHeadEditor
from app.settings import Settings
from ml.errors import PCBMError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
ORIGINS = "models"  # key of Dataset.info: {str(model id): {"path": model dir, "sha256": file hash}}
NO_GROUP = "(none)"  # the group name of images without one, when others have one
_ID_OVERHEAD = 120  # rough bytes per image id held in Python lists and dicts


class NotServable(Conflict):
    """The model exists but cannot be served (not imported, or its files are gone or changed)."""

    code = "model_not_servable"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` (or None) is cuda when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_origin(dataset_info: Mapping[str, Any] | None, model_id: int) -> dict[str, Any] | None:
    """Where an imported model's file is: ``{"workspace", "path", "sha256"}``, or None.

    The import records it in the model's dataset row (``Dataset.info``), next to the
    workspace and embedded dataset the model was trained on.
    """
    info = dataset_info or {}
    entry = (info.get(ORIGINS) or {}).get(str(model_id))
    if not isinstance(entry, dict) or not info.get("workspace"):
        return None
    return {"workspace": info["workspace"], "path": entry.get("path"), "sha256": entry.get("sha256")}


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass(frozen=True)
class SplitData:
    """One evaluation split: its cache (based on the entry's head) and what the cache does not hold."""

    name: str
    cache: Any  # ml.evaluation.EvalCache on the service's device
    image_ids: list[str]
    residual: torch.Tensor | None  # (N, K) PCBM-h residual logits, fixed across head versions

    @property
    def logits(self) -> torch.Tensor:
        return self.cache.base_logits

    def group_of(self, row: int) -> str | None:
        if self.cache.groups is None:
            return None
        return self.cache.group_names[int(self.cache.groups[row])]


@dataclass(frozen=True)
class LoadedModel:
    """An immutable snapshot of one served model at one head version."""

    model_id: int
    name: str
    kind: str
    version: int
    weights_hash: str
    state: HeadState  # the head version's tensors and config, as stored
    model: Any  # ml.pcbm.PCBM or PCBMHybrid with that head, on the CPU
    splits: dict[str, SplitData]
    index: dict[str, tuple[str, int]]  # image id -> (split, row)
    dataset_root: Path
    backbone_spec: str
    backbone_identity: str
    nbytes: int

    @property
    def classes(self) -> list[str]:
        return list(self.model.classes_)

    @property
    def concept_names(self) -> list[str]:
        return list(self.model.bank.names)

    @property
    def head(self) -> Any:
        return self.model.head


@dataclass(frozen=True)
class _Record:
    """What loading a model needs from the database, read in one short session."""

    model_id: int
    name: str
    kind: str
    version: int
    weights_hash: str
    origin: dict[str, Any] | None
    dataset: dict[str, Any]
    classes: list[str]
    backbone_spec: str
    backbone_identity: str


class ServiceHeadEditor:
    """Edits with ``ml.editing`` (:class:`MlHeadEditor`) on the service's concept banks.

    Models without a bank on disk (registered directly rather than imported, or whose
    file is gone) fall back to :class:`TensorHeadEditor`, which implements the same
    operations on the weights, so a model's history stays editable whatever its files.
    """

    def __init__(self, service: ModelService):
        self._service = service
        self._ml = MlHeadEditor(service.bank_for)
        self._tensor = TensorHeadEditor()

    def __call__(self, model: ModelInfo, state: HeadState, edits: Sequence[Mapping[str, Any]]) -> EditOutcome:
        try:
            bank = self._service.bank_for(model)
        except NotServable as exc:
            log.warning("editing model %s without its concept bank: %s", model.model_id, exc.message)
            bank = None
        if bank is None:
            return self._tensor(model, state, edits)
        return self._ml(model, state, edits)


class ModelService:
    """Loaded models and backbones of one process (kept on ``AppContext.models``).

    Parameters
    ----------
    settings : the app's settings (device, memory budget, image limits).
    session_factory : opens the short database sessions the service reads with.
    artifacts : the artifact store holding every head version's weights.
    device : where caches and backbones live; default ``settings.device`` (auto: cuda if present).
    memory_budget_bytes : overrides ``settings.model_memory_budget_mb`` (tests use tiny budgets).
    preview_limit, inference_limit : the app's concurrency limits (own ones when not given).
    """

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], artifacts: ArtifactStore,
                 device: str | torch.device | None = None, *, memory_budget_bytes: int | None = None,
                 preview_limit: ConcurrencyLimit | None = None, inference_limit: ConcurrencyLimit | None = None):
        self.settings = settings
        self.session_factory = session_factory
        self.artifacts = artifacts
        self.device = resolve_device(device if device is not None else settings.device)
        self.memory_budget_bytes = int(memory_budget_bytes or settings.model_memory_budget_mb * MIB)
        self.preview_limit = preview_limit or ConcurrencyLimit(
            "preview", settings.preview_concurrency, settings.overload_wait_s)
        self.inference_limit = inference_limit or ConcurrencyLimit(
            "inference", settings.inference_concurrency, settings.overload_wait_s)
        self.errors: dict[int, str] = {}  # model id -> why load_all could not load it
        self.evictions = 0
        self._lru: OrderedDict[tuple[str, Any], tuple[Any, int]] = OrderedDict()  # key -> (value, bytes)
        self._banks: dict[tuple[int, str], Any] = {}  # (model id, file hash) -> ConceptBank, for the editor
        self._lock = threading.RLock()
        self._key_locks: dict[tuple[str, Any], threading.Lock] = {}
        # Uploads of every model sharing a backbone go through one forward pass per batch,
        # on the batcher's worker thread (see submit_image).
        self.batcher = MicroBatcher(self._embed_batch, window_s=settings.predict_batch_window_ms / 1000,
                                    max_batch=settings.predict_max_batch, max_pending=settings.predict_max_pending,
                                    name="inference batcher")

    # -- bookkeeping -----------------------------------------------------------------------------
    @contextmanager
    def _session(self) -> Iterator[Session]:
        session = self.session_factory()
        try:
            yield session
        finally:
            session.close()

    def _key_lock(self, key: tuple[str, Any]) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _peek(self, key: tuple[str, Any]) -> Any:
        with self._lock:
            item = self._lru.get(key)
            if item is None:
                return None
            self._lru.move_to_end(key)
            return item[0]

    def _put(self, key: tuple[str, Any], value: Any, nbytes: int) -> None:
        with self._lock:
            self._lru[key] = (value, nbytes)
            self._lru.move_to_end(key)
            total = sum(size for _, size in self._lru.values())
            for old in list(self._lru):
                if total <= self.memory_budget_bytes:
                    break
                if old == key:
                    continue  # the newest item stays even when it alone is over budget
                total -= self._lru.pop(old)[1]
                self.evictions += 1
                log.info("model service: evicted %s to stay under %d bytes", old, self.memory_budget_bytes)

    @property
    def memory_used_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._lru.values())

    def loaded_model_ids(self) -> list[int]:
        """Ids of the models in memory, least recently used first."""
        with self._lock:
            return [key[1] for key in self._lru if key[0] == "model"]

    def peek(self, model_id: int) -> LoadedModel | None:
        """The model's entry if it is in memory (at whatever version it was loaded), else None."""
        return self._peek(("model", model_id))

    def invalidate(self, model_id: int) -> None:
        """Drop a model's entry (it reloads on next use)."""
        with self._lock:
            self._lru.pop(("model", model_id), None)

    # -- reading the database --------------------------------------------------------------------
    def _record(self, session: Session, model_id: int) -> _Record:
        model = history.get_model(session, model_id)
        if model.head_number < 1:
            raise NotServable(f"model {model_id} has no versions yet")
        weights_hash = session.scalar(select(ModelVersion.weights_hash).where(
            ModelVersion.model_id == model_id, ModelVersion.number == model.head_number))
        dataset = session.get(Dataset, model.dataset_id)
        backbone = session.get(Backbone, model.backbone_id)
        assert dataset is not None and backbone is not None  # foreign keys
        return _Record(model_id=model.id, name=model.name, kind=model.kind.value, version=model.head_number,
                       weights_hash=weights_hash or "", origin=model_origin(dataset.info, model.id),
                       dataset=dict(dataset.info or {}),
                       classes=list(dataset.classes or []), backbone_spec=backbone.spec,
                       backbone_identity=backbone.identity)

    # -- models ----------------------------------------------------------------------------------
    def get(self, model_id: int) -> LoadedModel:
        """The model at its current head version, loading or re-heading it as needed.

        Raises NotFound for an unknown id and :class:`NotServable` for a model without files.
        """
        with self._session() as session:
            record = self._record(session, model_id)
        key = ("model", model_id)
        entry = self._peek(key)
        if entry is not None and (entry.version, entry.weights_hash) == (record.version, record.weights_hash):
            return entry
        with self._key_lock(key):
            entry = self._peek(key)  # another thread may have done it meanwhile
            if entry is not None and (entry.version, entry.weights_hash) == (record.version, record.weights_hash):
                return entry
            if entry is not None and entry.version > record.version:
                return entry  # versions only grow: a newer head was loaded since we read ours
            try:
                state = self._state(record)
                entry = self._rehead(entry, record, state) if entry is not None else self._load(record, state)
            except (PCBMError, OSError) as exc:  # damaged or missing files: the server's problem, not the caller's
                raise NotServable(f"model {record.name!r} cannot be loaded: {exc}") from None
            self._put(key, entry, entry.nbytes)
            self.errors.pop(model_id, None)
            return entry

    def _state(self, record: _Record) -> HeadState:
        with self._session() as session:
            return history.load_state(session, self.artifacts, record.model_id, record.version)

    @staticmethod
    def _model_file(name: str, origin: dict[str, Any] | None) -> Path:
        """The model's ``model.safetensors``, checked against the hash recorded at import."""
        from ml.pcbm import MODEL_FILE
        from ml.store import file_sha256, safe_join

        if not origin:
            raise NotServable(f"model {name!r} was not imported from a workspace, so it has no "
                              "embedded dataset or concept bank on disk to serve")
        try:
            path = safe_join(origin["workspace"], origin["path"])
        except (KeyError, TypeError):
            raise NotServable(f"model {name!r} has a damaged origin record; import its workspace again") from None
        file = path / MODEL_FILE if path.is_dir() else path
        if not file.is_file():
            raise NotServable(f"the file of model {name!r} is missing: {file}")
        if file_sha256(file) != origin.get("sha256"):
            raise NotServable(f"the file of model {name!r} changed since it was imported ({file}); "
                              "import the workspace again to register the new model")
        return file

    def with_head(self, entry: LoadedModel, state: HeadState) -> Any:
        """``entry``'s model (bank, residual) with another head state, e.g. an edit's result."""
        return self._with_head(entry.model, state, entry.classes)

    def _with_head(self, base_model: Any, state: HeadState, classes: list[str]) -> Any:
        from ml.head import SparseLinearHead
        from ml.pcbm import PCBM, PCBMHybrid

        head = SparseLinearHead.from_state(state.tensors, state.config)
        pcbm = PCBM(base_model.bank, head, classes)
        return base_model.copy(pcbm) if isinstance(base_model, PCBMHybrid) else pcbm

    def _load(self, record: _Record, state: HeadState) -> LoadedModel:
        from ml.embed import EmbeddedDataset
        from ml.evaluation import EvalCache
        from ml.pcbm import PCBMHybrid, load_model
        from ml.store import safe_join

        file = self._model_file(record.name, record.origin)
        try:
            embeddings_path = safe_join(record.dataset["workspace"], record.dataset["embeddings"])
        except (KeyError, TypeError):
            raise NotServable(f"the dataset of model {record.name!r} does not say where its embeddings are") from None
        stored = load_model(file)
        classes = record.classes or list(stored.classes_)
        model = self._with_head(stored, state, classes)
        embedded = EmbeddedDataset.load(embeddings_path)
        if list(embedded.classes) != classes:
            raise NotServable(f"the embedded dataset {embeddings_path} has other classes than model {record.name!r}")
        named = [g for g in embedded.groups if g is not None]
        group_names = sorted(set(named) | ({NO_GROUP} if len(named) < len(embedded.groups) else set())) if named else None
        splits: dict[str, SplitData] = {}
        index: dict[str, tuple[str, int]] = {}
        nbytes = _nbytes(*state.tensors.values(), model.bank.vectors, model.bank.intercepts)
        with torch.no_grad():
            for name in sorted(set(embedded.splits)):
                part = embedded.split(name)
                groups = [NO_GROUP if g is None else g for g in part.groups] if group_names else None
                cache = EvalCache.build(model, part, groups=groups, group_names=group_names, device=self.device)
                residual = None
                if isinstance(model, PCBMHybrid):
                    residual = model.residual_logits(part.embeddings).to(self.device)
                splits[name] = SplitData(name, cache, list(part.image_ids), residual)
                index.update((image_id, (name, row)) for row, image_id in enumerate(part.image_ids))
                nbytes += _nbytes(cache.features_t, cache.labels, cache.groups, cache.base_logits,
                                  cache.base_weight, cache.base_bias, residual)
                nbytes += sum(len(i) + _ID_OVERHEAD for i in part.image_ids)
        return LoadedModel(model_id=record.model_id, name=record.name, kind=record.kind, version=record.version,
                           weights_hash=record.weights_hash, state=state, model=model, splits=splits, index=index,
                           dataset_root=Path(record.dataset.get("root") or embedded.dataset_root),
                           backbone_spec=record.backbone_spec,
                           backbone_identity=model.bank.backbone_identity or record.backbone_identity, nbytes=nbytes)

    def _rehead(self, entry: LoadedModel, record: _Record, state: HeadState) -> LoadedModel:
        """The entry with another head version: same cached scores, logits recomputed in full."""
        model = self._with_head(entry.model, state, entry.classes)
        head = model.head
        first = next(iter(entry.splits.values()), None)
        if first is not None and not (torch.equal(head.mean_, first.cache.mean)
                                      and torch.equal(head.scale_, first.cache.scale)):
            return self._load(record, state)  # standardisation changed: the cached scores do not fit
        weight, bias = head.weight_.to(self.device), head.bias_.to(self.device)
        splits = {}
        with torch.no_grad():
            for name, split in entry.splits.items():
                logits = torch.addmm(bias, split.cache.features_t.T, weight.T)
                if split.residual is not None:
                    logits = logits + split.residual
                cache = dataclasses.replace(split.cache, base_logits=logits, base_weight=weight, base_bias=bias,
                                            _base_report=None)
                splits[name] = dataclasses.replace(split, cache=cache)
        return dataclasses.replace(entry, version=record.version, weights_hash=record.weights_hash, state=state,
                                   model=model, splits=splits)

    def imported_model_ids(self) -> list[int]:
        """Ids of the models with files on disk (imported from a workspace), in id order."""
        with self._session() as session:
            rows = session.execute(select(Model.id, Dataset.info).join(Dataset, Model.dataset_id == Dataset.id)
                                   .order_by(Model.id))
            return [model_id for model_id, info in rows if model_origin(info, model_id) is not None]

    def load_all(self, ctx: Any = None) -> dict[int, str]:
        """Load every imported model until the memory budget is used; usable as ``create_app``'s
        ``model_loader``. A model that fails to load is logged and left out (``errors``), so one
        broken file does not take the server down. Returns ``{model id: "loaded" | why not}``.
        """
        outcome: dict[int, str] = {}
        for model_id in self.imported_model_ids():
            if self.memory_used_bytes >= self.memory_budget_bytes:
                outcome[model_id] = "not loaded: the memory budget is used (it loads on first use)"
                continue
            try:
                self.get(model_id)
            except (AppError, PCBMError, OSError) as exc:
                message = getattr(exc, "message", None) or str(exc)
                self.errors[model_id] = message
                outcome[model_id] = message
                log.warning("model service: cannot load model %s: %s", model_id, message)
            else:
                outcome[model_id] = "loaded"
        return outcome

    # -- editing ---------------------------------------------------------------------------------
    def bank_for(self, info: ModelInfo) -> Any:
        """The concept bank of an imported model (for :class:`MlHeadEditor`); None if it has none."""
        entry = self._peek(("model", info.model_id))
        if entry is not None:
            return entry.model.bank
        with self._session() as session:
            model = session.get(Model, info.model_id)
            if model is None:
                return None
            name = model.name
            origin = model_origin(session.scalar(select(Dataset.info).where(Dataset.id == model.dataset_id)),
                                  model.id)
        if origin is None:
            return None
        cache_key = (info.model_id, str(origin.get("sha256")))
        bank = self._banks.get(cache_key)
        if bank is None:
            from ml.pcbm import load_model

            bank = load_model(self._model_file(name, origin)).bank
            with self._lock:
                self._banks[cache_key] = bank
        return bank

    def head_editor(self) -> ServiceHeadEditor:
        return ServiceHeadEditor(self)

    # -- backbones and inference -----------------------------------------------------------------
    def backbone(self, spec: str) -> Any:
        """The backbone a spec names, loaded once and shared by every model that uses it."""
        from ml.backbone import load_backbone

        key = ("backbone", spec)
        found = self._peek(key)
        if found is not None:
            return found
        with self._key_lock(key):
            found = self._peek(key)
            if found is None:
                found = load_backbone(spec, device=self.device)
                module = getattr(found, "model", None)
                size = sum(_nbytes(p) for p in module.parameters()) if isinstance(module, torch.nn.Module) else 0
                self._put(key, found, size)
            return found

    def submit_image(self, entry: LoadedModel, image: Any) -> Future:
        """Queue one decoded image for ``entry``'s backbone; the future resolves to its (1, d) embedding.

        Preprocessing runs here, in the caller's thread, so it overlaps the batch in flight.
        The forward pass runs on the micro-batcher's worker thread together with other
        uploads for the same backbone, under the inference limit; a full queue is 503 with
        ``Retry-After`` at once.
        """
        backbone = self.backbone(entry.backbone_spec)
        if entry.backbone_identity and backbone.identity != entry.backbone_identity:
            raise NotServable(f"backbone {entry.backbone_spec!r} is not the one model {entry.name!r} was built "
                              "with (its weights or preprocessing changed)")
        pixels = backbone.preprocess(image)
        return self.batcher.submit((entry.backbone_spec, backbone.identity), pixels)

    def embed_image(self, entry: LoadedModel, image: Any) -> torch.Tensor:
        """Embed one decoded image for ``entry``'s model, (1, d) on the CPU (blocks until its batch ran).

        Call it from a worker thread, never on the event loop; async code awaits
        :meth:`submit_image`'s future instead.
        """
        return self.submit_image(entry, image).result()

    def _embed_batch(self, key: tuple[str, str], pixels: list[torch.Tensor]) -> list[Any]:
        """The batcher's work: one forward pass for queued uploads of one backbone."""
        from ml.embed import embed_pixels
        from ml.errors import DataError

        spec, identity = key
        with self.inference_limit.slot():
            backbone = self.backbone(spec)
            if backbone.identity != identity:  # reloaded with other files since the upload was queued
                return [NotServable(f"backbone {spec!r} changed while the upload waited; send it again")
                        for _ in pixels]
            with torch.no_grad():
                embeddings = embed_pixels(backbone, torch.stack(pixels), check=False).to("cpu", torch.float32)
        finite = torch.isfinite(embeddings).all(dim=1).tolist()  # one bad image fails its own request only
        return [row.unsqueeze(0) if ok else DataError("the backbone produced NaN/Inf embeddings for this image")
                for row, ok in zip(embeddings, finite, strict=True)]

