"""``pcbm suggest``: proposals from ``ml.suggest`` on a workspace, each previewed on every split.

Every proposal is previewed with the incremental preview (``ml.evaluation.preview_edits``)
on every split of the model's embedded dataset. For TF-TTI the shots are drawn from the
target split with ``seed`` and the target split is also previewed without them
(``"<target>:heldout"``), the number that says whether the adaptation generalises.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ml.errors import ConfigError, DataError
from ml.workspace import Workspace

METHODS = ("tfti", "greedy", "spurious", "concept")
HELDOUT = "{}:heldout"


def split_caches(model: Any, embedded: Any) -> dict[str, Any]:
    """An EvalCache per split, with one group vocabulary across splits ("(none)" for missing groups)."""
    from ml.evaluation import EvalCache

    named = [g for g in embedded.groups if g is not None]
    group_names = sorted(set(named) | ({"(none)"} if len(named) < len(embedded.groups) else set())) if named else None
    caches = {}
    for name in sorted(set(embedded.splits)):
        part = embedded.split(name)
        groups = ["(none)" if g is None else g for g in part.groups] if group_names else None
        caches[name] = EvalCache.build(model, part, groups=groups, group_names=group_names)
    return caches


def summarize(preview: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one split's ``preview_edits`` result that a person compares."""
    before, after = preview["before"], preview["after"]
    worst_before, worst_after = before["worst_group"], after["worst_group"]
    return {
        "n": before["n"],
        "accuracy": {"before": before["accuracy"], "after": after["accuracy"], "delta": preview["delta"]["accuracy"]},
        "balanced_accuracy": {"before": before["balanced_accuracy"], "after": after["balanced_accuracy"],
                              "delta": preview["delta"]["balanced_accuracy"]},
        "worst_group": {"before": worst_before["accuracy"] if worst_before else None,
                        "after": worst_after["accuracy"] if worst_after else None,
                        "group_after": worst_after["group"] if worst_after else None,
                        "delta": preview["delta"]["worst_group_accuracy"]},
        "newly_correct": preview["flips"]["newly_correct"], "newly_wrong": preview["flips"]["newly_wrong"],
    }


def preview_all(model: Any, caches: dict[str, Any], edits: list[Any]) -> tuple[Any, dict[str, Any]]:
    """The edited model and its summary preview on every cached split."""
    from ml.editing import apply_edits
    from ml.evaluation import preview_edits

    edited, _ = apply_edits(model, edits)
    with torch.no_grad():
        return edited, {name: summarize(preview_edits(cache, model, edited, max_flips=0))
                        for name, cache in caches.items()}


def _need_split(caches: dict[str, Any], name: str, what: str) -> Any:
    if name not in caches:
        raise DataError(f"no {what} split {name!r}; the splits are {', '.join(caches)}")
    return caches[name]


def suggest(
    root: Path, model_name: str, method: str, embeddings_name: str | None = None,
    target_split: str = "test_shifted", source_split: str = "train", shots: int = 4, k: int = 5,
    metric: str = "accuracy", seed: int = 0, per_class: bool = False, split: str | None = None, top: int = 5,
    phrase: str | None = None, max_source_drop: float = 0.015,
) -> dict[str, Any]:
    """Proposals of ``method`` for model ``model_name``, each with its preview on every split.

    tfti: ``shots`` labelled images per class of ``target_split`` (drawn with ``seed``) against
    ``source_split``, refusing edits that lower ``source_split`` accuracy by more than
    ``max_source_drop``; greedy: up to ``k`` prunes maximising ``metric`` on ``target_split``
    (proposal j = the first j steps); spurious: the ``top`` concepts of the ranking on
    ``split`` (default: every split pooled); concept: add the text concept ``phrase``.
    """
    from ml import suggest as sg
    from ml.workflows import _load_embedded, _load_model, default_embeddings

    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    workspace = Workspace.open(root)
    embeddings_name = default_embeddings(workspace, embeddings_name)
    model = _load_model(workspace, model_name)
    embedded = _load_embedded(workspace, embeddings_name)
    caches = split_caches(model, embedded)
    params: dict[str, Any] = {"target_split": target_split, "source_split": source_split}
    result: dict[str, Any] = {"model": model_name, "embeddings": embeddings_name, "method": method, "seed": seed}
    proposals: list[Any] = []
    cumulative = False
    if method == "tfti":
        target = _need_split(caches, target_split, "target")
        rows = sg.sample_shots(target.labels, shots, seed)
        rest = torch.ones(target.labels.shape[0], dtype=torch.bool)
        rest[rows] = False
        if not rest.any():
            raise DataError(f"split {target_split!r} has no images left once the shots are taken")
        proposals = sg.tfti_proposals(model, _need_split(caches, source_split, "source"), sg.cache_rows(target, rows),
                                      max_source_drop=max_source_drop)
        caches[HELDOUT.format(target_split)] = sg.cache_rows(target, rest.nonzero().flatten())
        image_ids = embedded.split(target_split).image_ids
        params.update(shots=shots, max_source_drop=max_source_drop)
        result["shots"] = {"split": target_split, "per_class": shots, "n": int(rows.numel()),
                           "image_ids": [image_ids[r] for r in rows.tolist()]}
    elif method == "greedy":
        steps = sg.greedy_prunes(model, _need_split(caches, target_split, "target"), k=k, metric=metric,
                                 per_class=per_class)
        proposals, cumulative = sg.greedy_proposals(steps, metric), True
        params.update(k=k, metric=metric, per_class=per_class)
        result["steps"] = [{**s, "edit": s["edit"].to_dict()} for s in steps]
    elif method == "spurious":
        # default: every split pooled (the most images of each class away from its usual group)
        data = [_need_split(caches, split, "ranking")] if split else list(caches.values())
        ranking = sg.spurious_ranking(model, data)
        proposals = sg.spurious_proposals(ranking, top=top)
        params = {"split": split or "all", "top": top}
        result["ranking"] = [{key: row[key] for key in ("rank", "concept", "score", "eta2", "class_eta2")}
                             for row in ranking]
    else:
        return {**result, **_concept(workspace, model, embedded, caches, phrase, source_split)}
    result["params"] = params
    result["proposals"] = []
    applied: list[Any] = []
    for number, proposal in enumerate(proposals, 1):
        applied = applied + proposal.edits if cumulative else proposal.edits
        _, preview = preview_all(model, caches, applied)
        row = {"id": number, **proposal.to_dict(), "preview": preview}
        if cumulative:  # a greedy step assumes the earlier ones: the proposal is the whole prefix
            row["edits"] = [e.to_dict() for e in applied]
        result["proposals"].append(row)
    every = applied if cumulative else [e for p in proposals for e in p.edits]
    result["combined"] = {"edits": [e.to_dict() for e in every],
                          "preview": preview_all(model, caches, every)[1] if every else {}}
    return result


def _concept(workspace: Workspace, model: Any, embedded: Any, caches: dict[str, Any], phrase: str | None,
             source_split: str) -> dict[str, Any]:
    """Add a typed text concept (only its column fitted on ``source_split``) and preview it.

    The split caches are extended by the one new column (``ml.suggest.extend_cache``), not rebuilt.
    """
    from ml import suggest as sg
    from ml.editing import add_text_concept
    from ml.evaluation import preview_edits
    from ml.workflows import _backbone

    if not phrase or not phrase.strip():
        raise ConfigError("method 'concept' needs --phrase TEXT")
    _need_split(caches, source_split, "training")
    _, backbone = _backbone(workspace, None)
    train = embedded.split(source_split)
    new_model, record = add_text_concept(model, backbone, phrase.strip(), train.embeddings, train.labels)
    preview = {}
    with torch.no_grad():
        for name, cache in caches.items():
            extended, padded = sg.extend_cache(cache, model, new_model, embedded.split(name).embeddings)
            preview[name] = summarize(preview_edits(extended, padded, new_model, max_flips=0))
    return {"params": {"phrase": phrase, "source_split": source_split},
            "proposals": [{"id": 1, "source": "user", "kind": "add_concept",
                           "title": f"add the concept “{record['concept']}”", "concepts": [record["concept"]], "edits": [], "evidence": {"record": record},
                           "preview": preview}],
            "combined": {"edits": [], "preview": preview}}


def measure(root: Path, model_name: str = "pcbm", seeds: Sequence[int] = range(5), shots: int = 4,
            target_split: str = "test_shifted", in_split: str = "test", group_suffix: str = " background",
            embeddings_name: str | None = None, max_source_drop: float = 0.015) -> dict[str, Any]:
    """The numbers docs/suggestions.md reports, on a workspace whose spurious concepts end in ``group_suffix``.

    TF-TTI per seed (``shots`` per class of ``target_split``): accuracy before/after on
    ``in_split`` and on the target split without the shots; greedy (k=5, accuracy and worst
    group) against pruning every spurious concept by hand on the target split; the spurious
    ranking's ranks of those concepts (every split pooled, and each split alone).
    """
    from ml import suggest as sg
    from ml.editing import Edit
    from ml.workflows import _load_embedded, _load_model

    workspace = Workspace.open(root)
    model = _load_model(workspace, model_name)
    caches = split_caches(model, _load_embedded(workspace, embeddings_name))
    target = _need_split(caches, target_split, "target")
    planted = [c for c in model.bank.names if c.endswith(group_suffix)]
    out: dict[str, Any] = {"model": model_name, "shots_per_class": shots, "planted": planted,
                           "max_source_drop": max_source_drop, "tfti": []}
    for seed in seeds:
        rows = sg.sample_shots(target.labels, shots, seed)
        rest = torch.ones(target.labels.shape[0], dtype=torch.bool)
        rest[rows] = False
        proposals = sg.tfti_proposals(model, caches["train"], sg.cache_rows(target, rows),
                                      max_source_drop=max_source_drop)
        edits = [e for p in proposals for e in p.edits]
        views = {in_split: caches[in_split], "heldout": sg.cache_rows(target, rest.nonzero().flatten())}
        preview = preview_all(model, views, edits)[1] if edits else None
        out["tfti"].append({"seed": seed, "proposals": [p.title for p in proposals], **{
            name: (preview[name]["accuracy"]["before"], preview[name]["accuracy"]["after"]) if preview else None
            for name in views}})
    hand = preview_all(model, {target_split: target, in_split: caches[in_split]},
                       [Edit("prune", c, source="user") for c in planted])[1]
    out["hand_prune"] = {name: (v["accuracy"]["before"], v["accuracy"]["after"]) for name, v in hand.items()}
    for metric in ("accuracy", "worst_group"):
        if metric == "worst_group" and target.groups is None:
            continue
        steps = sg.greedy_prunes(model, target, k=5, metric=metric)
        out[f"greedy_{metric}"] = [{"concept": s["concept"], "metric": s["metric"], "accuracy": s["accuracy"]}
                                   for s in steps]
    for label, data in [("all", list(caches.values()))] + [(name, cache) for name, cache in caches.items()]:
        ranking = sg.spurious_ranking(model, data)
        out[f"spurious_ranks_{label}"] = {r["concept"]: r["rank"] for r in ranking if r["concept"] in planted}
        out[f"spurious_top_{label}"] = [(r["concept"], round(r["score"], 4)) for r in ranking[:len(planted) + 2]]
    return out


if __name__ == "__main__":  # python -m ml.suggest_workflow WORKSPACE [MODEL] [N_SEEDS]
    import json
    import sys

    args = sys.argv[1:]
    report = measure(Path(args[0]), args[1] if len(args) > 1 else "pcbm", range(int(args[2]) if len(args) > 2 else 5))
    print(json.dumps(report, indent=1))
