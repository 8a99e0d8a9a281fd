"""Concept maps and concept metrics of served models, on top of the model service.

Maps come from :mod:`ml.cam`: one backbone pass per image (under the inference limit,
from a worker thread; never on the event loop) gives spatial tokens, which are cached by
image content, so every further concept, class, opacity or head edit costs a few tensor
operations. Concept metrics run in a background thread (:meth:`MapService.metrics`): the
expensive per-image table is computed once per backbone, bank, split and method and kept
in memory and under ``<workspace>/cache/concept-metrics``; the head-dependent summary
(existence, location, CGIM) is recomputed on every request, so it follows each edit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from app import plots
from app.errors import AppError, InvalidInput, Unavailable
from app.services.inspect import _decode_upload, _locate  # noqa: PLC2701 - the same image rules
from app.services.model_service import LoadedModel, ModelService, NotServable
from ml import cam
from ml.errors import DataError, PCBMError

log = logging.getLogger(__name__)

MAX_MAPS = 64  # maps per request
TOKEN_CACHE_BYTES = 128 * 1024 * 1024
RETRY_FAILED_S = 60.0
_SERVICES: weakref.WeakKeyDictionary[ModelService, MapService] = weakref.WeakKeyDictionary()
_SERVICES_LOCK = threading.Lock()


def map_service(models: ModelService) -> MapService:
    """The map service of a model service (one per process, created on first use)."""
    with _SERVICES_LOCK:
        found = _SERVICES.get(models)
        if found is None:
            found = _SERVICES[models] = MapService(models)
        return found


def _clean(value: Any) -> Any:
    """NaN and infinities become None, so a report is always valid JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _names(values: list[str], limit: int = 10) -> str:
    return ", ".join(values[:limit]) + (", ..." if len(values) > limit else "")


def requested(values: list[str] | None, known: list[str]) -> list[str]:
    """Repeated query values; a single comma-separated value is split unless it is itself a name."""
    out: list[str] = []
    for value in values or []:
        parts = [value] if value in known or "," not in value else [p.strip() for p in value.split(",") if p.strip()]
        out.extend(p for p in parts if p not in out)
    return out


class MapService:
    def __init__(self, models: ModelService):
        self.models = models
        self.tokens = cam.TokenCache(TOKEN_CACHE_BYTES)
        self._tables: dict[str, dict[str, Any]] = {}  # key -> {"status", "table" | "reason", "progress", ...}
        self._read: dict[str, tuple[int | None, Any]] = {}  # annotation folder -> (mtime, Annotations)
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pcbm-metrics")

    # -- one image --------------------------------------------------------------------------
    def _backbone(self, entry: LoadedModel):
        backbone = self.models.backbone(entry.backbone_spec)
        if entry.backbone_identity and backbone.identity != entry.backbone_identity:
            raise NotServable(f"backbone {entry.backbone_spec!r} is not the one model {entry.name!r} was built with")
        return backbone

    def tokens_of(self, entry: LoadedModel, image, method: cam.MapMethod) -> tuple[torch.Tensor, Any]:
        """(tokens (h, w, d), backbone) of a decoded image; a cached image needs no inference slot."""
        key = (entry.backbone_identity or entry.backbone_spec, method.tokens, cam.image_digest(image))
        with self.models.inference_limit.slot():
            backbone = self._backbone(entry)  # loading is cached; the slot bounds the memory it takes
            found = self.tokens.get(key)
            if found is None:
                with torch.no_grad():
                    found = cam.spatial_tokens(backbone, [image], method)[0]
                self.tokens.put(key, found)
        return found, backbone

    def method(self, entry: LoadedModel, method: str | None) -> cam.MapMethod:
        return cam.parse_method(method, cam.architecture(self._backbone(entry)))

    def maps(self, entry: LoadedModel, image, concepts: list[str], classes: list[str],
             method: str | None = None) -> dict[str, Any]:
        """Grid-resolution maps (h, w) of the named concepts and classes of a decoded image."""
        if not concepts and not classes:
            raise InvalidInput("name at least one concept (concepts=) or class (class=) to map")
        if len(concepts) + len(classes) > MAX_MAPS:
            raise InvalidInput(f"at most {MAX_MAPS} maps per request")
        unknown = [c for c in concepts if c not in entry.concept_names]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise InvalidInput(f"unknown concept{plural} {_names([repr(u) for u in unknown])}: "
                               f"not in the concept bank of model {entry.name!r}", detail={"unknown_concepts": unknown})
        bad = [c for c in classes if c not in entry.classes]
        if bad:
            raise InvalidInput(f"unknown class{'es' if len(bad) > 1 else ''} {_names([repr(c) for c in bad])}; the "
                               f"classes of model {entry.name!r} are {_names(entry.classes)}",
                               detail={"unknown_classes": bad})
        chosen = self.method(entry, method)
        tokens, backbone = self.tokens_of(entry, image, chosen)
        bank = entry.model.bank
        with torch.no_grad():
            tokens = tokens[None]
            out = []
            if concepts:
                rows = [bank.index(c) for c in concepts]
                grid = cam.maps_from_tokens(tokens, bank.subset(concepts), chosen) if chosen.contrast is None \
                    else cam.maps_from_tokens(tokens, bank, chosen)[:, rows]
                out += [("concept", c, grid[0, i]) for i, c in enumerate(concepts)]
            if classes:
                raw = cam.score_maps(tokens, bank)
                grid = cam.class_maps(raw, entry.head, [entry.classes.index(k) for k in classes])
                out += [("class", k, grid[0, i]) for i, k in enumerate(classes)]
        return {"method": chosen.name, "size": int(backbone.image_size), "maps": out}

    # -- views of the maps ------------------------------------------------------------------
    @staticmethod
    def as_json(result: dict[str, Any], resolution: str = "image") -> dict[str, Any]:
        size = result["size"]
        maps = []
        for kind, name, grid in result["maps"]:
            values = cam.upsample(grid[None, None], size)[0, 0] if resolution == "image" else grid
            maps.append({"kind": kind, "name": name, "min": float(grid.min()), "max": float(grid.max()),
                         "mean": float(grid.mean()), "values": values.tolist()})
        grid_shape = list(result["maps"][0][2].shape) if result["maps"] else []
        return {"method": result["method"], "resolution": resolution, "grid": grid_shape,
                "size": [size, size] if resolution == "image" else grid_shape, "maps": maps}

    @staticmethod
    def scale(kind: str, grid: torch.Tensor, method: str = "") -> tuple[str, float, float, str]:
        """(colour scale, vmin, vmax, label): classes diverge about zero; softmax maps are shares
        on a fixed 0..1 scale (an absent concept stays dark); other maps use their own range."""
        if kind == "class":
            limit = float(grid.abs().max()) or 1.0
            return "diverging", -limit, limit, "contribution to the class logit"
        if method.endswith("+softmax"):
            return "viridis", 0.0, 1.0, "share of each place that is this concept"
        low, high = float(grid.min()), float(grid.max())
        return "viridis", low, high if high > low else low + 1.0, "concept map"

    def overlay_png(self, image, kind: str, grid: torch.Tensor, opacity: float, side: int, method: str = "") -> bytes:
        cmap, vmin, vmax, _ = self.scale(kind, grid, method)
        view = cam.input_view(image, side)
        return plots.overlay_png(view, grid.numpy(), opacity=opacity, cmap=cmap, vmin=vmin, vmax=vmax)

    # -- dataset images and uploads -----------------------------------------------------------
    def image(self, entry: LoadedModel, image_id: str):
        from ml.data import open_image

        _, _, path = _locate(entry, image_id)
        if not path.is_file():
            raise NotServable(f"the file of image {image_id!r} is missing from the dataset folder")
        return open_image(path, max_pixels=self.models.settings.max_image_pixels)

    def upload(self, data: bytes):
        return _decode_upload(data, self.models.settings.max_image_pixels)

    # -- concept metrics ----------------------------------------------------------------------
    def _annotations(self, root, load):
        """The annotation folder, read once per change of its attributes.csv (pages ask often)."""
        table = root / "attributes.csv"
        stamp = table.stat().st_mtime_ns if table.is_file() else None
        with self._lock:
            found = self._read.get(str(root))
        if found is not None and found[0] == stamp:
            return found[1]
        annotations = load(root)  # DataError when there is nothing to read
        with self._lock:
            self._read[str(root)] = (stamp, annotations)
        return annotations

    def _key(self, entry: LoadedModel, split: str, method: cam.MapMethod, root: str) -> str:
        bank = entry.model.bank
        digest = hashlib.sha256()
        for part in (entry.backbone_identity, entry.backbone_spec, split, method.name, root, *bank.names):
            digest.update(part.encode() + b"\0")
        digest.update(bank.vectors.numpy().tobytes())
        digest.update(bank.intercepts.numpy().tobytes())
        return digest.hexdigest()

    def _cache_path(self, key: str):
        return self.models.settings.workspace / "cache" / "concept-metrics" / f"{key}.safetensors"

    def metrics(self, model_id: int, split: str | None = None, method: str | None = None,
                l: int = 5, wait_s: float = 0.0) -> dict[str, Any]:
        """``{"status": "ready" | "running" | "unavailable" | "failed", ...}``; never blocks for
        longer than ``wait_s``. "ready" carries the report of the model's current head."""
        from ml.metrics_workflow import LocalisationTable, load_annotations, summarise

        entry = self.models.get(model_id)
        names = list(entry.splits)
        split = split or ("test" if "test" in names else names[0])
        if split not in entry.splits:
            raise InvalidInput(f"unknown split {split!r}; the splits are {_names(names)}")
        base = {"model_id": entry.model_id, "version": entry.version, "split": split}
        try:
            annotations = self._annotations(entry.dataset_root, load_annotations)
            chosen = self.method(entry, method)
        except DataError as exc:
            return {**base, "status": "unavailable", "reason": str(exc)}
        key = self._key(entry, split, chosen, str(annotations.root))
        with self._lock:
            state = self._tables.get(key)
            if state is None and self._cache_path(key).is_file():
                try:
                    state = {"status": "ready", "table": LocalisationTable.load(self._cache_path(key))}
                except PCBMError:
                    state = None
                else:
                    self._tables[key] = state
            stale = (state is not None and state["status"] == "failed"
                     and time.monotonic() - state["at"] > RETRY_FAILED_S)
            if state is None or stale:
                state = self._tables[key] = {"status": "running", "progress": 0.0, "at": time.monotonic()}
                done = threading.Event()
                state["done"] = done
                self._worker.submit(self._compute, key, entry, split, chosen, annotations, done)
        if state["status"] == "running" and wait_s > 0:
            state["done"].wait(wait_s)
        if state["status"] == "running":
            return {**base, "status": "running", "method": chosen.name, "progress": state["progress"]}
        if state["status"] == "failed":
            return {**base, "status": "failed", "method": chosen.name, "reason": state["reason"]}
        part = entry.splits[split]
        with torch.no_grad():
            z = part.cache.features_t.T.to("cpu")
            report = summarise(state["table"], entry.head, z, part.logits.to("cpu"), part.cache.labels.to("cpu"), l=l)
        return _clean({**base, "status": "ready", **report})

    def _compute(self, key: str, entry: LoadedModel, split: str, method: cam.MapMethod, annotations, done) -> None:
        from ml.metrics_workflow import localise

        state = self._tables[key]
        try:
            image_ids = entry.splits[split].image_ids

            def progress(finished: int, total: int) -> None:
                state["progress"] = finished / max(total, 1)

            with torch.no_grad():
                table = localise(self._backbone(entry), entry.model.bank, entry.dataset_root, image_ids, annotations,
                                 method=method.name, progress=progress, slot=self._slot, cache=None)
            try:
                table.save(self._cache_path(key))
            except OSError as exc:  # a read-only workspace still serves the metrics from memory
                log.warning("cannot cache concept metrics: %s", exc)
            state.update(status="ready", table=table)
        except (PCBMError, AppError, OSError) as exc:
            state.update(status="failed", reason=getattr(exc, "message", None) or str(exc), at=time.monotonic())
        except Exception as exc:  # a bug must not leave the state "running" forever
            log.exception("concept metrics failed")
            state.update(status="failed", reason=f"internal error ({type(exc).__name__})", at=time.monotonic())
        finally:
            done.set()

    @contextmanager
    def _slot(self) -> Iterator[None]:
        """One inference slot per batch; when the server is busy the background job waits, not fails."""
        limit = self.models.inference_limit
        while True:
            held = limit.slot()
            try:
                held.__enter__()
            except Unavailable:
                continue
            break
        try:
            yield
        finally:
            held.__exit__(None, None, None)


FLAG_WEIGHT_SHARE = 0.5  # |weight| at least this share of the largest ...
FLAG_EXISTENCE = 0.5  # ... and really present in fewer than this share of its top-l appearances


def flagged(max_abs_weight: float, largest: float, existence: float | None) -> bool:
    """High weight but rarely there: the model leans on something the images rarely show."""
    return bool(largest > 0 and max_abs_weight >= FLAG_WEIGHT_SHARE * largest
                and existence is not None and existence < FLAG_EXISTENCE)


def concept_checks(models: ModelService | None, model_id: int) -> tuple[dict[str, dict[str, Any]], str | None]:
    """({concept: {"existence", "location"}}, a note when there are none yet) for the pages.

    Never blocks and never fails a page: metrics still running, unavailable or failed give
    an empty mapping and a note saying why.
    """
    if models is None:
        return {}, None
    try:
        report = map_service(models).metrics(model_id)
    except (AppError, PCBMError) as exc:
        return {}, f"Existence and location need a served model: {getattr(exc, 'message', None) or exc}"
    status = report.get("status")
    if status == "running":
        return {}, f"Existence and location are being computed ({report.get('progress', 0.0):.0%}); reload soon."
    if status != "ready":
        return {}, f"No existence or location scores: {report.get('reason', 'no annotations')}"
    rows = {name: {"existence": row.get("existence"), "location": row.get("location")}
            for name, row in report.get("per_concept", {}).items()}
    return rows, None


def colour_only_png(kind: str, grid: torch.Tensor, side: int, service: MapService, method: str = "") -> bytes:
    """The coloured map alone (no image pixels): what an upload's PNG answer is, so no upload is echoed."""
    from PIL import Image

    cmap, vmin, vmax, _ = service.scale(kind, grid, method)
    return plots.overlay_png(Image.new("RGB", (side, side)), grid.numpy(), opacity=1.0, cmap=cmap, vmin=vmin, vmax=vmax)


__all__ = ["FLAG_EXISTENCE", "FLAG_WEIGHT_SHARE", "MAX_MAPS", "MapService", "colour_only_png", "concept_checks",
           "flagged", "map_service", "requested"]
