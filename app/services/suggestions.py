"""Suggested edits for a served model (``ml.suggest``), each with its preview on every split.

Proposals come from three sources: TF-TTI few-shot adaptation ("tfti"), a greedy prune
search ("greedy") and the spurious-concept ranking ("spurious"). Every proposal is a
list of ordinary edits whose ``source`` names where it came from; applying it is the
ordinary commit (``history.commit_edit``), so it becomes a versioned edit like any other
and the edit record keeps its source. Previews go through :func:`inspect.preview`, the
path commits use, so what a proposal shows is exactly what applying it gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from app.errors import InvalidInput
from app.services import inspect
from app.services.head_editing import HeadEditor
from app.services.model_service import LoadedModel, ModelService, SplitData
from ml.errors import DataError

METHODS = ("tfti", "greedy", "spurious")
METRICS = ("accuracy", "worst_group", "balanced_accuracy")
HELDOUT = "{} (without the shots)"
DEFAULTS: dict[str, Any] = {"target_split": None, "source_split": None, "shots": 4, "seed": 0, "shot_ids": None,
                            "k": 5, "metric": "accuracy", "per_class": False, "split": None, "top": 5,
                            "max_source_drop": 0.015}


def target_split(names: Sequence[str]) -> str:
    """The split adaptation aims at: a shifted / out-of-distribution one if any, else test."""
    for name in names:
        if "shift" in name.lower() or "ood" in name.lower():
            return name
    return "test" if "test" in names else (list(names)[-1] if names else "")


def source_split(names: Sequence[str]) -> str:
    return "train" if "train" in names else (list(names)[0] if names else "")


def _split(entry: LoadedModel, name: str, what: str) -> SplitData:
    if name not in entry.splits:
        raise InvalidInput(f"unknown {what} split {name!r}; the splits of model {entry.name!r} are "
                           f"{', '.join(entry.splits)}")
    return entry.splits[name]


def _shot_rows(split: SplitData, params: Mapping[str, Any]) -> torch.Tensor:
    from ml.suggest import sample_shots

    ids = params.get("shot_ids")
    if not ids:
        return sample_shots(split.cache.labels.cpu(), int(params["shots"]), int(params["seed"]))
    where = {image_id: row for row, image_id in enumerate(split.image_ids)}
    missing = [i for i in ids if i not in where]
    if missing:
        raise InvalidInput(f"images not in split {split.name!r}: {', '.join(map(repr, missing[:5]))}")
    return torch.tensor(sorted({where[i] for i in ids}), dtype=torch.long)


def _without(split: SplitData, rows: torch.Tensor) -> SplitData:
    """``split`` without some images (the shots), its cache cut by ``ml.suggest.cache_rows``."""
    from ml.suggest import cache_rows

    keep = torch.ones(len(split.image_ids), dtype=torch.bool)
    keep[rows] = False
    index = keep.nonzero().flatten()
    if index.numel() == 0:
        raise InvalidInput(f"split {split.name!r} has no images left once the shots are taken")
    residual = None if split.residual is None else split.residual[index.to(split.residual.device)]
    return SplitData(HELDOUT.format(split.name), cache_rows(split.cache, index),
                     [split.image_ids[i] for i in index.tolist()], residual)


def _proposals(entry: LoadedModel, method: str, params: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """(proposals, extra) for ``method``; extra holds what the caller shows besides them."""
    from ml import suggest as sg

    names = list(entry.splits)
    if method == "tfti":
        target = _split(entry, params["target_split"] or target_split(names), "target")
        source = _split(entry, params["source_split"] or source_split(names), "source")
        rows = _shot_rows(target, params)
        proposals = sg.tfti_proposals(entry.model, source.cache, sg.cache_rows(target.cache, rows),
                                      max_source_drop=float(params["max_source_drop"]))
        labels = target.cache.labels[rows.to(target.cache.labels.device)].tolist()
        shots = {"split": target.name, "n": int(rows.numel()), "seed": params["seed"],
                 "images": [{"image_id": target.image_ids[r], "label": entry.classes[y]}
                            for r, y in zip(rows.tolist(), labels, strict=True)]}
        return proposals, {"shots": shots, "heldout": _without(target, rows),
                           "params": {"target_split": target.name, "source_split": source.name,
                                      "max_source_drop": params["max_source_drop"]}}
    if method == "greedy":
        target = _split(entry, params["split"] or params["target_split"] or target_split(names), "search")
        steps = sg.greedy_prunes(entry.model, target.cache, k=int(params["k"]), metric=params["metric"],
                                 per_class=bool(params["per_class"]))
        return sg.greedy_proposals(steps, params["metric"]), {
            "cumulative": True, "params": {"split": target.name, "k": params["k"], "metric": params["metric"],
                                           "per_class": bool(params["per_class"])}}
    # default: every split pooled (the most images of each class away from its usual group)
    chosen = [_split(entry, params["split"], "ranking")] if params["split"] else list(entry.splits.values())
    ranking = sg.spurious_ranking(entry.model, [split.cache for split in chosen])
    ranked = [{key: row[key] for key in ("rank", "concept", "score", "eta2", "class_eta2")} for row in ranking]
    return sg.spurious_proposals(ranking, top=int(params["top"])), {
        "ranking": ranked, "params": {"split": params["split"] or "all", "top": params["top"]}}


def _check(method: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
    if method not in METHODS:
        raise InvalidInput(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(params or {}) - set(DEFAULTS))
    if unknown:
        raise InvalidInput(f"unknown parameters: {', '.join(unknown)}")
    merged = {**DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
    if merged["metric"] not in METRICS:
        raise InvalidInput(f"unknown metric {merged['metric']!r}; choose one of {', '.join(METRICS)}")
    return merged


def _heldout_preview(svc: ModelService, entry: LoadedModel, split: SplitData, edits: list[dict[str, Any]],
                     max_flips: int) -> dict[str, Any]:
    from ml.editing import apply_edits
    from ml.evaluation import preview_edits

    # the weights commits give: the service's editor is ml.editing.apply_edits on this very head
    edited, _ = apply_edits(entry.model, edits)
    with svc.preview_limit.slot(), torch.no_grad():
        result = preview_edits(split.cache, entry.model, edited, max_flips=max_flips)
    return inspect._split_preview(split, result, entry.classes)  # noqa: SLF001 - the same shape as every split


def suggest(svc: ModelService, model_id: int, method: str, params: Mapping[str, Any] | None = None, *,
            editor: HeadEditor | None = None, max_flips: int = 12) -> dict[str, Any]:
    """Proposals of ``method`` for the model's current version, each previewed on every split.

    ``params``: tfti -- ``target_split`` (default: the shifted split, else test),
    ``source_split`` (default train), ``shots`` per class drawn with ``seed`` or explicit
    ``shot_ids`` (image ids of the target split), ``max_source_drop`` (refuse edits that lower
    source accuracy by more than this; 1: no budget); greedy -- ``split`` (default the target
    split), ``k``, ``metric`` (accuracy | worst_group | balanced_accuracy), ``per_class``;
    spurious -- ``split`` (default: every split pooled), ``top``. A greedy proposal is a prefix of the
    greedy path (its edits include the earlier steps'). TF-TTI previews add the target
    split without its shots. Raises InvalidInput (422) for unknown splits, parameters or
    a split without groups (spurious).
    """
    params = _check(method, params)
    entry = svc.get(model_id)
    try:
        with svc.preview_limit.slot(), torch.no_grad():
            proposals, extra = _proposals(entry, method, params)
    except DataError as exc:  # e.g. a split without group labels: the request, not the data, is wrong
        raise InvalidInput(str(exc)) from None
    heldout, cumulative = extra.pop("heldout", None), extra.pop("cumulative", False)
    rows, applied = [], []
    for number, proposal in enumerate(proposals, 1):
        edits = [e.to_dict() for e in proposal.edits]
        applied = applied + edits if cumulative else edits
        rows.append({"id": number, **proposal.to_dict(), "edits": applied,
                     "preview": _preview(svc, entry, applied, heldout, editor, max_flips)})
    every = applied if cumulative else [e for row in rows for e in row["edits"]]
    combined = {"edits": every, "preview": _preview(svc, entry, every, heldout, editor, max_flips) if every else []}
    return {"model_id": entry.model_id, "version": entry.version, "method": method, **extra,
            "proposals": rows, "combined": combined}


def _preview(svc: ModelService, entry: LoadedModel, edits: list[dict[str, Any]], heldout: SplitData | None,
             editor: HeadEditor | None, max_flips: int) -> list[dict[str, Any]]:
    splits = inspect.preview(svc, entry.model_id, edits, entry.version, editor=editor, max_flips=max_flips)["splits"]
    if heldout is not None:
        splits.append(_heldout_preview(svc, entry, heldout, edits, max_flips))
    return splits


__all__ = ["DEFAULTS", "HELDOUT", "METHODS", "source_split", "suggest", "target_split"]
