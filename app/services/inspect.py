"""Inspecting a served model: concept weights, edit previews, images, what-ifs and uploads.

Each function serves both the HTML page and the JSON endpoint. They read the model
service's cached splits (no re-embedding; only :func:`predict_upload` runs the backbone)
and return plain JSON-ready dicts. Image ids are dataset-relative paths, always confined
to the dataset root; uploaded bytes are decoded and never sent back.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import AppError, InvalidInput, NotFound, PayloadTooLarge, VersionConflict
from app.models import Backbone, ConceptBank, Dataset, Model, ModelVersion
from app.services import history
from app.services.head_editing import HeadEditor
from app.services.model_service import LoadedModel, ModelService, NotServable, SplitData, model_origin
from ml.errors import DataError

SORTS = ("abs", "weight", "max_abs_weight", "name", "quality", "index")
MAX_PER_PAGE = 500
MAX_ABS_WEIGHT = 1e6  # larger edited weights (or what-if scores) would overflow float32 logits


class UnsupportedImage(AppError):
    status_code = 415
    code = "unsupported_media_type"


class BadImage(AppError):
    status_code = 400
    code = "bad_image"


# -- small helpers ---------------------------------------------------------------------------

def _names(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(list(names)[:limit]) + (", ..." if len(names) > limit else "")


def _class_index(entry: LoadedModel, class_name: str, what: str = "class") -> int:
    if class_name not in entry.classes:
        raise InvalidInput(f"unknown {what} {class_name!r}; the classes of model {entry.name!r} are "
                           f"{_names(entry.classes)}")
    return entry.classes.index(class_name)


def _concept_index(entry: LoadedModel, concept: str) -> int:
    if concept not in entry.concept_names:
        raise InvalidInput(f"unknown concept {concept!r}: it is not in the concept bank of model {entry.name!r}",
                           detail={"unknown_concepts": [concept]})
    return entry.concept_names.index(concept)


def _quality(info: Mapping[str, Any] | None) -> tuple[float | None, str | None]:
    info = info or {}
    for key, kind in (("heldout_acc", "CAV accuracy"), ("auroc", "AUROC")):
        value = info.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            return float(value), kind
    return None, None


def model_id_by_name(svc: ModelService, name: str) -> int:
    """The id of the model called ``name`` (pages address models by name)."""
    with svc.session_factory() as session:
        model_id = session.scalar(select(Model.id).where(Model.name == name))
    if model_id is None:
        raise NotFound(f"no model named {name!r}")
    return model_id


# -- the head --------------------------------------------------------------------------------

def concept_weights(svc: ModelService, model_id: int, class_name: str | None = None, q: str | None = None,
                    sort: str = "abs", order: str = "desc", limit: int | None = None) -> dict[str, Any]:
    """One row per concept: its weight for ``class_name`` (or every class), max |weight|, quality.

    ``q`` keeps concepts whose name contains it (case-insensitive). ``sort`` is one of
    ``SORTS`` ("abs": |weight| for the class, else max |weight|); ``order`` "asc" | "desc".
    Concepts without a quality score sort last either way.
    """
    if sort not in SORTS:
        raise InvalidInput(f"unknown sort {sort!r}; choose one of {', '.join(SORTS)}")
    if order not in ("asc", "desc"):
        raise InvalidInput(f"unknown order {order!r}; choose asc or desc")
    if limit is not None and limit < 1:
        raise InvalidInput("limit must be at least 1")
    entry = svc.get(model_id)
    k = _class_index(entry, class_name) if class_name is not None else None
    weight = entry.head.weight_
    max_abs = weight.abs().amax(0).tolist()
    bank = entry.model.bank
    rows = []
    needle = (q or "").strip().lower()
    for c, name in enumerate(bank.names):
        if needle and needle not in name.lower():
            continue
        quality, quality_kind = _quality(bank.info[c] if c < len(bank.info) else None)
        rows.append({
            "concept": name, "index": c, "source": bank.sources[c] if c < len(bank.sources) else "text",
            "weight": float(weight[k, c]) if k is not None else None,
            "weights": None if k is not None else {cls: float(weight[i, c]) for i, cls in enumerate(entry.classes)},
            "max_abs_weight": float(max_abs[c]), "quality": quality, "quality_kind": quality_kind,
        })

    def key(row: dict[str, Any]) -> Any:
        if sort == "name":
            return row["concept"].lower()
        if sort == "index":
            return row["index"]
        if sort == "quality":
            return row["quality"]
        if sort == "weight" and k is not None:
            return row["weight"]
        if sort == "abs" and k is not None:
            return abs(row["weight"])
        return row["max_abs_weight"]

    present = [r for r in rows if key(r) is not None]
    missing = [r for r in rows if key(r) is None]
    present.sort(key=lambda r: (key(r), r["index"]) if order == "asc" else (key(r), -r["index"]),
                 reverse=order == "desc")
    rows = present + missing
    total = len(rows)
    return {"model_id": entry.model_id, "version": entry.version, "classes": entry.classes,
            "class_name": class_name, "q": q or "", "sort": sort, "order": order, "total": total,
            "concepts": rows[:limit] if limit else rows}


def head_matrix(svc: ModelService, model_id: int) -> dict[str, Any]:
    """The head's weights, classes x concepts (for the heatmap), with the bias per class."""
    entry = svc.get(model_id)
    weight = entry.head.weight_
    used = (weight != 0).any(0).tolist()
    return {"model_id": entry.model_id, "version": entry.version, "classes": entry.classes,
            "concepts": entry.concept_names, "weights": weight.tolist(), "bias": entry.head.bias_.tolist(),
            "nonzero_concepts": [n for n, u in zip(entry.concept_names, used, strict=True) if u]}


# -- previews --------------------------------------------------------------------------------

def _check_version(svc: ModelService, entry: LoadedModel, base_version: int) -> None:
    if entry.version == base_version:
        return
    with svc.session_factory() as session:
        current = history.head_version(session, entry.model_id)
        raise VersionConflict(
            f"model {entry.model_id} is at version {current.number}, not {base_version}; "
            "reload it and make the change again",
            detail={"current_version": history.version_summary(current)},
        )


def _validate_edits(entry: LoadedModel, edits: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    from ml.editing import Edit

    if not edits:
        raise InvalidInput("nothing to preview: the list of edits is empty")
    plain = [dict(e) for e in edits]
    parsed = [Edit.from_dict(e) for e in plain]  # ConfigError (422) names a bad op, field or value
    unknown = sorted({e.concept for e in parsed} - set(entry.concept_names))
    if unknown:
        raise InvalidInput(f"unknown concept{'s' if len(unknown) > 1 else ''} {_names([repr(u) for u in unknown])}: "
                           f"not in the concept bank of model {entry.name!r}", detail={"unknown_concepts": unknown})
    bad_classes = sorted({e.class_name for e in parsed if e.class_name is not None} - set(entry.classes))
    if bad_classes:
        raise InvalidInput(f"unknown class{'es' if len(bad_classes) > 1 else ''} "
                           f"{_names([repr(c) for c in bad_classes])}; the classes of model {entry.name!r} are "
                           f"{_names(entry.classes)}", detail={"unknown_classes": bad_classes})
    return plain


def _edited(svc: ModelService, entry: LoadedModel, edits: list[dict[str, Any]], editor: HeadEditor | None):
    """The edit's outcome by the very editor commits use, so committed weights equal previewed ones."""
    with svc.session_factory() as session:
        info = history.model_info(session, history.get_model(session, entry.model_id), svc.artifacts)
    outcome = (editor or svc.head_editor())(info, entry.state, edits)
    weight = outcome.state.tensors.get("weight")
    if weight is not None and not (torch.isfinite(weight).all() and weight.abs().max() <= MAX_ABS_WEIGHT):
        raise InvalidInput(f"the edits would give weights beyond ±{MAX_ABS_WEIGHT:g}; use smaller values")
    return outcome, svc.with_head(entry, outcome.state)


def _pairs(names: Sequence[str], before: Mapping[str, Any], after: Mapping[str, Any],
           counts: list[int]) -> list[dict[str, Any]]:
    return [{"name": n, "n": counts[i], "before": before.get(n), "after": after.get(n)} for i, n in enumerate(names)]


def _split_preview(split: SplitData, result: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    cache = split.cache
    before, after = result["before"], result["after"]
    class_counts = torch.bincount(cache.labels, minlength=len(classes)).tolist()
    groups: list[dict[str, Any]] = []
    if cache.groups is not None:
        group_counts = torch.bincount(cache.groups, minlength=len(cache.group_names)).tolist()
        groups = _pairs(cache.group_names, before["per_group"], after["per_group"], group_counts)
    flips = result["flips"]
    return {
        "name": split.name, "n": before["n"],
        "accuracy": {"before": before["accuracy"], "after": after["accuracy"], "delta": result["delta"]["accuracy"]},
        "balanced_accuracy": {"before": before["balanced_accuracy"], "after": after["balanced_accuracy"],
                              "delta": result["delta"]["balanced_accuracy"]},
        "worst_group": {"before": before["worst_group"], "after": after["worst_group"],
                        "delta": result["delta"]["worst_group_accuracy"]},
        "groups": groups,
        "classes": _pairs(classes, before["per_class"], after["per_class"], class_counts),
        "n_flipped": flips["count"], "newly_correct": flips["newly_correct"], "newly_wrong": flips["newly_wrong"],
        "flipped": [{"image_id": split.image_ids[f["index"]], "label": classes[f["label"]],
                     "before": classes[f["old_pred"]], "after": classes[f["new_pred"]]} for f in flips["examples"]],
        "flipped_truncated": flips["truncated"],
    }


def preview(svc: ModelService, model_id: int, edits: Sequence[Mapping[str, Any]], base_version: int, *,
            editor: HeadEditor | None = None, max_flips: int = 24) -> dict[str, Any]:
    """What ``edits`` on ``base_version`` would do on every split; nothing is saved.

    Raises VersionConflict (409, current version in ``detail``) when ``base_version`` is not
    the head, InvalidInput (422) naming unknown concepts or classes, and 503 when every
    preview slot is busy. ``editor`` should be the one commits use (``ctx.head_editor``).
    """
    from ml.evaluation import preview_edits

    entry = svc.get(model_id)
    _check_version(svc, entry, base_version)
    plain = _validate_edits(entry, edits)
    with svc.preview_limit.slot():
        outcome, edited = _edited(svc, entry, plain, editor)
        with torch.no_grad():
            splits = [_split_preview(split, preview_edits(split.cache, entry.model, edited, max_flips=max_flips),
                                     entry.classes) for split in entry.splits.values()]
    changed = sorted({c["concept"] for r in outcome.records for c in r.get("changes", [])})
    if not changed:  # records of the tensor editor have another shape
        changed = [n for n, d in zip(entry.concept_names, (edited.head.weight_ != entry.head.weight_).any(0).tolist(),
                                     strict=True) if d]
    return {"model_id": entry.model_id, "base_version": base_version, "edits": plain, "records": outcome.records,
            "changed_concepts": changed, "splits": splits}


def edit_metrics(svc: ModelService, model_id: int, edits: Sequence[Mapping[str, Any]], base_version: int,
                 editor: HeadEditor | None = None) -> dict[str, Any] | None:
    """Per-split reports of the head ``edits`` would give (the metrics a committed version keeps);
    None when the model is not served (then the commit simply records no metrics)."""
    try:
        entry = svc.get(model_id)
    except (NotServable, DataError):  # a model that cannot be served can still be edited
        return None
    if entry.version != base_version:
        return None  # the commit itself reports the conflict
    _, edited = _edited(svc, entry, _validate_edits(entry, edits), editor)
    reports = {}
    with torch.no_grad():
        for name, split in entry.splits.items():
            logits, _ = split.cache.logits_for(edited)
            reports[name] = split.cache.report(logits)
    return reports


# -- images ----------------------------------------------------------------------------------

def _locate(entry: LoadedModel, image_id: str) -> tuple[SplitData, int, Any]:
    """(split, row, path) of a dataset image; traversal attempts raise DataError (400)."""
    from ml.store import safe_join

    if not isinstance(image_id, str) or not image_id.strip():
        raise InvalidInput("an image id is needed")
    path = safe_join(entry.dataset_root, image_id)
    found = entry.index.get(image_id)
    if found is None:
        raise NotFound(f"model {entry.name!r} has no image {image_id!r}")
    return entry.splits[found[0]], found[1], path


def _prediction(entry: LoadedModel, logits: torch.Tensor) -> dict[str, Any]:
    probs = torch.softmax(logits.float(), 0)
    k = int(probs.argmax())
    order = probs.argsort(descending=True).tolist()
    return {"predicted": entry.classes[k], "confidence": float(probs[k]),
            "probabilities": [{"class_name": entry.classes[i], "probability": float(probs[i])} for i in order]}


def _explanation(entry: LoadedModel, z: torch.Tensor, logits: torch.Tensor, residual: torch.Tensor | None,
                 k: int, top: int | None = None) -> dict[str, Any]:
    """Contributions ``W[k, c] * z_c`` of the concepts with a weight for class ``k``, largest |value| first."""
    head = entry.head
    weights = head.weight_[k]
    used = weights.nonzero().flatten()
    values = weights[used] * z[used]
    order = values.abs().argsort(descending=True, stable=True).tolist()
    if top is not None:
        order = order[:top]
    names = entry.concept_names
    return {
        "explained_class": entry.classes[k], "logit": float(logits[k]), "bias": float(head.bias_[k]),
        "residual": float(residual[k]) if residual is not None else None,
        "contributions": [{"concept": names[int(used[j])], "weight": float(weights[used[j]]),
                           "score": float(z[used[j]]), "contribution": float(values[j])} for j in order],
    }


def _concept_scores(entry: LoadedModel, z: torch.Tensor) -> list[dict[str, Any]]:
    raw = z * entry.head.scale_ + entry.head.mean_
    return [{"concept": n, "score": float(r), "standardized": float(s)}
            for n, r, s in zip(entry.concept_names, raw.tolist(), z.tolist(), strict=True)]


def _row(split: SplitData, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    z = split.cache.features_t[:, row].to("cpu")
    logits = split.logits[row].to("cpu")
    residual = split.residual[row].to("cpu") if split.residual is not None else None
    return z, logits, residual


def browse_images(svc: ModelService, model_id: int, split: str | None = None, label: str | None = None,
                  predicted: str | None = None, correct: bool | None = None, group: str | None = None,
                  page: int = 1, per_page: int = 48) -> dict[str, Any]:
    """A page of one split's images with the current head's predictions, filtered.

    ``split`` defaults to "test" (else the first split); ``label``/``predicted`` are class
    names, ``group`` a group name. A page past the end is empty, not an error.
    """
    if page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
        raise InvalidInput(f"page must be >= 1 and per_page between 1 and {MAX_PER_PAGE}")
    entry = svc.get(model_id)
    names = list(entry.splits)
    split = split or ("test" if "test" in entry.splits else names[0])
    if split not in entry.splits:
        raise InvalidInput(f"unknown split {split!r}; the splits are {_names(names)}")
    data = entry.splits[split]
    cache = data.cache
    with torch.no_grad():
        probs = torch.softmax(data.logits.float(), 1)
        confidence, preds = probs.max(1)
        mask = torch.ones_like(cache.labels, dtype=torch.bool)
        if label:
            mask &= cache.labels == _class_index(entry, label, "label")
        if predicted:
            mask &= preds == _class_index(entry, predicted, "predicted class")
        if correct is not None:
            mask &= (preds == cache.labels) == bool(correct)
        if group:
            if cache.groups is None or group not in cache.group_names:
                known = _names(cache.group_names) if cache.groups is not None else "none"
                raise InvalidInput(f"unknown group {group!r} in split {split!r}; its groups are {known}")
            mask &= cache.groups == cache.group_names.index(group)
        rows = mask.nonzero().flatten().to("cpu")
    total = int(rows.numel())
    shown = rows[(page - 1) * per_page: page * per_page].tolist()
    labels, preds, confidence = cache.labels.to("cpu"), preds.to("cpu"), confidence.to("cpu")
    items = [{"image_id": data.image_ids[r], "label": entry.classes[int(labels[r])],
              "predicted": entry.classes[int(preds[r])], "correct": bool(labels[r] == preds[r]),
              "confidence": float(confidence[r]), "group": data.group_of(r)} for r in shown]
    groups = sorted({g for s in entry.splits.values() for g in s.cache.group_names})
    return {"model_id": entry.model_id, "version": entry.version, "split": split,
            "filters": {"label": label, "predicted": predicted, "correct": correct, "group": group},
            "total": total, "page": page, "per_page": per_page, "pages": max(1, math.ceil(total / per_page)),
            "items": items, "options": {"splits": names, "classes": entry.classes, "groups": groups}}


def image_detail(svc: ModelService, model_id: int, image_id: str, class_name: str | None = None) -> dict[str, Any]:
    """One dataset image: label, prediction, probabilities, concept scores and the contributions
    to ``class_name``'s logit (default: the predicted class). Negative contributions are concepts
    whose presence speaks *against* the class ("NOT concept"); the page words that."""
    entry = svc.get(model_id)
    split, row, _ = _locate(entry, image_id)
    z, logits, residual = _row(split, row)
    prediction = _prediction(entry, logits)
    k = _class_index(entry, class_name) if class_name else entry.classes.index(prediction["predicted"])
    label = entry.classes[int(split.cache.labels[row])]
    return {"model_id": entry.model_id, "version": entry.version, "image_id": image_id, "split": split.name,
            "label": label, "group": split.group_of(row), "correct": prediction["predicted"] == label,
            **prediction, "concept_scores": _concept_scores(entry, z), **_explanation(entry, z, logits, residual, k)}


def image_file(svc: ModelService, model_id: int, image_id: str, max_side: int | None = None) -> tuple[bytes, str]:
    """A dataset image decoded and re-encoded as PNG (optionally shrunk to ``max_side``)."""
    from PIL import Image

    from ml.data import open_image

    entry = svc.get(model_id)
    _, _, path = _locate(entry, image_id)
    if not path.is_file():
        raise NotFound(f"the file of image {image_id!r} is missing from the dataset folder")
    image = open_image(path, max_pixels=svc.settings.max_image_pixels)
    if max_side is not None:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def whatif(svc: ModelService, model_id: int, image_id: str, concept: str, score: float) -> dict[str, Any]:
    """The prediction if this image's score for ``concept`` were ``score`` (raw concept-score units)."""
    if isinstance(score, bool) or not isinstance(score, int | float) or not abs(score) <= MAX_ABS_WEIGHT:
        raise InvalidInput(f"score must be a number between -{MAX_ABS_WEIGHT:g} and {MAX_ABS_WEIGHT:g}, got {score!r}")
    entry = svc.get(model_id)
    split, row, _ = _locate(entry, image_id)
    c = _concept_index(entry, concept)
    z, logits, _ = _row(split, row)
    head = entry.head
    z_new = (float(score) - float(head.mean_[c])) / float(head.scale_[c])
    after_logits = logits + head.weight_[:, c] * (z_new - float(z[c]))
    before, after = torch.softmax(logits.float(), 0), torch.softmax(after_logits.float(), 0)
    order = torch.maximum(before, after).argsort(descending=True).tolist()
    predicted_before, predicted_after = entry.classes[int(before.argmax())], entry.classes[int(after.argmax())]
    return {"model_id": entry.model_id, "version": entry.version, "image_id": image_id, "concept": concept,
            "score_before": float(z[c]) * float(head.scale_[c]) + float(head.mean_[c]), "score_after": float(score),
            "predicted_before": predicted_before, "predicted_after": predicted_after,
            "changed": predicted_before != predicted_after,
            "probabilities": [{"class_name": entry.classes[i], "before": float(before[i]), "after": float(after[i])}
                              for i in order]}


# Markup that would run if these bytes were ever rendered as a page (GIF/HTML and similar
# polyglots decode as valid images). Each pattern is specific enough that compressed pixels
# match it by chance less than once per 10**6 MB (the shortest: "<html" or "<body" plus a
# delimiter); a polyglot always does.
_MARKUP = re.compile(rb"<(?:script|iframe|object|embed|html|body)[\s/>]|<!doctype\s+html|http://www\.w3\.org/2000/svg"
                     rb"|javascript:|\bon(?:error|load)\s*=", re.IGNORECASE)


def _decode_upload(data: bytes, max_pixels: int) -> Any:
    """Decode uploaded bytes; errors carry fixed messages, so no uploaded byte is ever echoed."""
    from ml.data import IMAGE_FORMATS, open_image

    if not data:
        raise BadImage("the upload is empty")
    if _MARKUP.search(bytes(data)):  # a GIF/HTML (or PNG/HTML ...) polyglot: valid pixels, live markup
        raise UnsupportedImage("the upload carries HTML or script markup; only plain images are accepted")
    try:
        return open_image(bytes(data), max_pixels=max_pixels)
    except DataError as exc:
        text = str(exc)
    if "over the limit" in text or "decompression bomb" in text:
        raise PayloadTooLarge(f"the image has too many pixels to decode safely (limit: {max_pixels:,} pixels)")
    if "allowed format" in text:
        raise UnsupportedImage(f"the upload is not an image in an allowed format ({', '.join(IMAGE_FORMATS)})")
    raise BadImage("the image is damaged or truncated and cannot be decoded")


@dataclass(frozen=True)
class PendingPrediction:
    """An upload decoded, checked and queued for its backbone (see :func:`submit_upload`)."""

    entry: LoadedModel
    width: int
    height: int
    top: int
    embedding: Future | None  # resolves to the (1, d) embedding, computed in a micro-batch


def _upload(svc: ModelService, model_id: int, data: bytes, top: int) -> tuple[LoadedModel, Any]:
    if top < 1:
        raise InvalidInput("top must be at least 1")
    entry = svc.get(model_id)
    return entry, _decode_upload(data, svc.settings.max_image_pixels)


def submit_upload(svc: ModelService, model_id: int, data: bytes, top: int = 10) -> PendingPrediction:
    """Decode an upload (format allow-list, pixel limit) and queue it for the model's backbone.

    Runs in a worker thread (database read, decoding, preprocessing); the forward pass runs
    in a micro-batch on the batcher's thread (503 with Retry-After when its queue is full).
    """
    entry, image = _upload(svc, model_id, data, top)
    return PendingPrediction(entry, image.width, image.height, top, svc.submit_image(entry, image))


def finish_upload(pending: PendingPrediction, embedding: torch.Tensor) -> dict[str, Any]:
    """Prediction, probabilities and the top concept contributions of an embedded upload."""
    entry = pending.entry
    model = entry.model
    with torch.no_grad():
        z = model.head.transform(model.bank.project(embedding))[0]
        residual = model.residual_logits(embedding)[0] if hasattr(model, "residual_logits") else None
        logits = z @ model.head.weight_.T + model.head.bias_
        if residual is not None:
            logits = logits + residual
    prediction = _prediction(entry, logits)
    k = entry.classes.index(prediction["predicted"])
    return {"model_id": entry.model_id, "version": entry.version, "width": pending.width, "height": pending.height,
            **prediction, "concept_scores": _concept_scores(entry, z),
            **_explanation(entry, z, logits, residual, k, top=pending.top)}


def predict_upload(svc: ModelService, model_id: int, data: bytes, top: int = 10) -> dict[str, Any]:
    """Classify an uploaded image: prediction, probabilities and the top concept contributions.

    The bytes are decoded with the format allow-list and pixel limit, embedded by the model's
    backbone in a micro-batch with other uploads (503 when the queue is full) and never
    stored or echoed. Blocks until the batch ran: call it from a worker thread; the API
    route awaits :func:`submit_upload`'s future instead.
    """
    entry, image = _upload(svc, model_id, data, top)
    embedding = svc.embed_image(entry, image)
    return finish_upload(PendingPrediction(entry, image.width, image.height, top, None), embedding)


# -- the home page ---------------------------------------------------------------------------

def model_summary(svc: ModelService, session: Session, model_id: int) -> dict[str, Any]:
    """What the home page shows of a model. Accuracy comes from the served head when the model
    is in memory at its current version, else from the metrics stored with the version."""
    model = history.get_model(session, model_id)
    dataset, bank = session.get(Dataset, model.dataset_id), session.get(ConceptBank, model.bank_id)
    backbone = session.get(Backbone, model.backbone_id)
    head = history.head_version(session, model_id) if model.head_number else None
    parent = session.get(ModelVersion, head.parent_id) if head is not None and head.parent_id else None
    entry = svc.peek(model_id)
    if entry is not None and head is not None and entry.weights_hash == head.weights_hash:
        accuracy = {name: float((s.logits.argmax(1) == s.cache.labels).float().mean()) if len(s.image_ids) else None
                    for name, s in entry.splits.items()}
    else:
        metrics = (head.metrics if head is not None else None) or {}
        accuracy = {split: m.get("accuracy") for split, m in metrics.items() if isinstance(m, dict)}
    status = svc.errors.get(model_id)
    imported = model_origin(dataset.info, model.id) is not None
    if not imported:
        status = "not imported from a workspace: only its history is available"
    return {
        "id": model.id, "name": model.name, "kind": model.kind.value, "version": model.head_number,
        "parent_version": parent.number if parent is not None else None,
        "updated_at": head.created_at if head is not None else model.created_at,
        "backbone": {"id": backbone.id, "spec": backbone.spec, "identity": backbone.identity},
        "dataset": {"id": dataset.id, "name": dataset.name, "classes": list(dataset.classes or []),
                    "splits": dict((dataset.info or {}).get("splits") or {})},
        "bank": {"id": bank.id, "name": bank.name, "n_concepts": len(bank.concepts)},
        "accuracy": accuracy, "loaded": entry is not None, "servable": imported and not status,
        "status": status,
    }


__all__ = ["SORTS", "BadImage", "PendingPrediction", "UnsupportedImage", "browse_images", "concept_weights",
           "edit_metrics", "finish_upload", "head_matrix", "image_detail", "image_file", "model_id_by_name",
           "model_summary", "predict_upload", "preview", "submit_upload", "whatif"]
