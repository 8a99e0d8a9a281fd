"""What a study found: held-out accuracy of every submission, two baselines, and agreement.

Everything is scored on the study's held-out target split with the base model's cached,
standardised concept scores (:class:`ml.evaluation.EvalCache` in the model service), from
scratch for each head (``Z @ W.T + b``, plus the residual of a PCBM-h), so a number never
depends on which head the cache happened to be built from. The unit of editing is a
*prune*: one (class, concept) weight of the base head set to zero; a participant's prunes
are the base head's non-zero weights that are zero in their final head.

Baselines, with the same budget of ``k`` prunes (the study's edit budget; without one,
the median number of prunes of the submissions, at least 1):

- **random**: ``k`` prunes drawn uniformly from the base head's non-zero weights with
  ``torch.randperm`` seeded 0 .. seeds-1; the mean (and sample sd) over seeds;
- **greedy oracle**: ``k`` times, the prune that most raises target accuracy, stopping
  early when none raises it (:func:`ml.suggest.greedy_prunes`, see :func:`oracle_prunes`).

Means are ``math.fsum(values) / n`` and sample standard deviations
``sqrt(fsum((x - mean)^2) / (n - 1))``, so an export reproduces them exactly.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from itertools import combinations
from typing import Any

import torch
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.models_studies import Participant, Study
from app.services import history
from app.services.artifacts import ArtifactStore
from app.services.head_editing import HeadState
from app.services.model_service import LoadedModel, ModelService, SplitData
from app.services.studies import event_counts, participant_status, participants

RANDOM_SEEDS = 20
DEFAULT_K = 5  # when there is neither a budget nor a submission to take it from

Prune = tuple[int, int]  # (class index, concept index)


# -- scoring heads on a split --------------------------------------------------------------------

def head_logits(split: SplitData, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Logits of a head on ``split`` from its cached standardised scores (and PCBM-h residual)."""
    features_t = split.cache.features_t
    device = features_t.device
    logits = torch.addmm(bias.to(device, features_t.dtype), features_t.T, weight.to(device, features_t.dtype).T)
    if split.residual is not None:
        logits = logits + split.residual
    return logits


def score(split: SplitData, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, Any]:
    """``{"correct", "n", "accuracy"}`` of a head on ``split``; accuracy = correct / n exactly."""
    with torch.no_grad():
        predictions = head_logits(split, weight, bias).argmax(1)
        correct = int((predictions == split.cache.labels).sum())
    n = int(split.cache.labels.numel())
    return {"correct": correct, "n": n, "accuracy": correct / n if n else None}


def prune_candidates(weight: torch.Tensor) -> list[Prune]:
    """Every non-zero weight of a head, class-major: what a prune can remove."""
    return [(int(k), int(c)) for k, c in (weight != 0).nonzero().tolist()]


def pruned_units(base_weight: torch.Tensor, weight: torch.Tensor) -> list[Prune]:
    """The base head's non-zero weights that are zero in ``weight``."""
    return [(int(k), int(c)) for k, c in ((base_weight != 0) & (weight == 0)).nonzero().tolist()]


def with_prunes(weight: torch.Tensor, prunes: Iterable[Prune]) -> torch.Tensor:
    pruned = weight.clone()
    for k, c in prunes:
        pruned[k, c] = 0.0
    return pruned


_states: OrderedDict[str, HeadState] = OrderedDict()  # weights hash -> state: content-addressed, never stale
_states_lock = threading.Lock()


def cached_state(artifacts: ArtifactStore, version: Any) -> HeadState:
    """A version's head state, kept in a small cache (treat its tensors as read-only)."""
    with _states_lock:
        found = _states.get(version.weights_hash)
        if found is not None:
            _states.move_to_end(version.weights_hash)
            return found
    state = history.version_state(artifacts, version)
    with _states_lock:
        _states[version.weights_hash] = state
        while len(_states) > 256:
            _states.popitem(last=False)
    return state


# -- the baselines -------------------------------------------------------------------------------

def random_prunes(candidates: Sequence[Prune], k: int, seed: int) -> list[Prune]:
    order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))
    return sorted(candidates[i] for i in order[:max(0, k)].tolist())


class _Memo:
    """Baselines per (split data, head, k): they take a while on big splits and never change."""

    def __init__(self, size: int = 16):
        self._items: OrderedDict[tuple, tuple[weakref.ref, Any]] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, anchor: torch.Tensor, key: tuple) -> Any:
        with self._lock:
            found = self._items.get((id(anchor), *key))
            # The weak reference proves the anchor is the same tensor, not a new one at a reused id.
            return found[1] if found is not None and found[0]() is anchor else None

    def put(self, anchor: torch.Tensor, key: tuple, value: Any) -> None:
        with self._lock:
            self._items[(id(anchor), *key)] = (weakref.ref(anchor), value)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


_baselines = _Memo()


def oracle_prunes(model: Any, split: SplitData, candidates: Sequence[Prune], k: int) -> list[Prune]:
    """Greedy forward selection of up to ``k`` prunes raising accuracy on ``split`` the most.

    This is :func:`ml.suggest.greedy_prunes` (metric "accuracy") restricted to one-class
    prunes of ``candidates``; it stops early when no prune raises accuracy.
    """
    from ml.suggest import greedy_prunes

    names, classes = list(model.bank.names), list(model.classes_)
    if not candidates or k < 1:
        return []
    steps = greedy_prunes(model, split.cache, k=k, metric="accuracy",
                          candidates=[(names[c], classes[j]) for j, c in candidates])
    return [(classes.index(step["class_name"]), names.index(step["concept"])) for step in steps]


def baselines(entry: LoadedModel, split: SplitData, base: HeadState, weights_hash: str, k: int,
              seeds: int = RANDOM_SEEDS, with_head: Any = None) -> dict[str, Any]:
    """The random and greedy-oracle baselines on ``split`` for the base head ``base``.

    ``with_head(entry, state)`` gives the model with another head (``ModelService.with_head``).
    """
    key = ("baselines", weights_hash, k, seeds)
    cached = _baselines.get(split.cache.features_t, key)
    if cached is not None:
        return cached
    weight, bias = base.tensors["weight"], base.tensors["bias"]
    candidates = prune_candidates(weight)
    runs = []
    for seed in range(seeds):
        prunes = random_prunes(candidates, k, seed)
        runs.append({"seed": seed, "prunes": prunes, **score(split, with_prunes(weight, prunes), bias)})
    with torch.no_grad():
        chosen = oracle_prunes(with_head(entry, base), split, candidates, k)
    accuracies = [r["accuracy"] for r in runs if r["accuracy"] is not None]
    result = {
        "k": k,
        "random": {"k": k, "seeds": seeds, "mean": mean(accuracies), "std": sample_std(accuracies), "runs": runs},
        "oracle": {"k": k, "prunes": chosen, **score(split, with_prunes(weight, chosen), bias)},
    }
    _baselines.put(split.cache.features_t, key, result)
    return result


# -- statistics ----------------------------------------------------------------------------------

def mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def sample_std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    centre = mean(values)
    return math.sqrt(math.fsum((v - centre) ** 2 for v in values) / (len(values) - 1))


def pairwise_jaccard(sets: Sequence[set]) -> dict[str, Any]:
    """Mean Jaccard index |A ∩ B| / |A ∪ B| over every pair of raters (two empty sets agree: 1)."""
    values = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in combinations(sets, 2)]
    return {"pairs": len(values), "mean": mean(values)}


def fleiss_kappa(counts: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa of ``counts[i][j]``: raters who put item i in category j (the same number per item).

    None when it is undefined: fewer than two raters or items, or every rating in one category.
    """
    rows = [list(map(int, row)) for row in counts]
    if not rows:
        return None
    raters = sum(rows[0])
    if any(sum(row) != raters for row in rows):
        raise ValueError("every item needs the same number of ratings")
    if raters < 2:
        return None
    items = len(rows)
    shares = [math.fsum(row[j] for row in rows) / (items * raters) for j in range(len(rows[0]))]
    agreement = [(math.fsum(n * n for n in row) - raters) / (raters * (raters - 1)) for row in rows]
    observed = math.fsum(agreement) / items
    expected = math.fsum(p * p for p in shares)
    if expected >= 1.0:
        return None
    return (observed - expected) / (1.0 - expected)


def agreement(pruned: Sequence[set[Prune]], units: Sequence[Prune]) -> dict[str, Any]:
    """Agreement of raters (submissions) on which units (base non-zero weights) they pruned."""
    jaccard = pairwise_jaccard(pruned)
    counts = [[sum(unit in p for p in pruned), sum(unit not in p for p in pruned)] for unit in units]
    return {"raters": len(pruned), "units": len(units), "jaccard_mean": jaccard["mean"],
            "jaccard_pairs": jaccard["pairs"],
            "fleiss_kappa": fleiss_kappa(counts) if len(pruned) >= 2 and units else None}


# -- progress (no model service needed) ----------------------------------------------------------

def progress(session: Session, artifacts: ArtifactStore, study: Study) -> list[dict[str, Any]]:
    """Per participant: status, current version, prunes kept, events logged, last activity."""
    events = event_counts(session, study.id)
    rows = []
    for participant in participants(session, study.id):
        version, n_prunes = None, 0
        if participant.model_id is not None:
            model = history.get_model(session, participant.model_id)
            version = model.head_number
            head = cached_state(artifacts, history.get_version(session, model.id, version))
            first = cached_state(artifacts, history.get_version(session, model.id, 1))
            n_prunes = len(pruned_units(first.tensors["weight"], head.tensors["weight"]))
        count, last = events.get(participant.id, (0, None))
        rows.append({"pseudonym": participant.pseudonym, "condition": participant.condition,
                     "status": participant_status(study, participant), "joined_at": participant.joined_at,
                     "deadline_at": participant.deadline_at, "submitted_at": participant.submitted_at,
                     "version": version, "n_prunes": n_prunes, "n_events": count, "last_event_at": last})
    return rows


# -- a whole study -------------------------------------------------------------------------------

def target_split(svc: ModelService, study: Study) -> tuple[LoadedModel, SplitData]:
    entry = svc.get(study.base_model_id)  # callers end their read transaction first (one connection at a time)
    split = entry.splits.get(study.target_split)
    if split is None:
        raise Conflict(f"the base model has no split {study.target_split!r} to score the study on")
    return entry, split


def budget_k(study: Study, prune_counts: Sequence[int]) -> tuple[int, str]:
    """The baselines' number of prunes, and where it comes from."""
    if study.edit_budget:
        return study.edit_budget, "edit budget"
    if prune_counts:
        ordered = sorted(prune_counts)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return max(1, int(math.floor(median + 0.5))), "median prunes of the submissions"
    return DEFAULT_K, "default"


def _unit(entry: LoadedModel, unit: Prune) -> dict[str, str]:
    return {"class_name": entry.classes[unit[0]], "concept": entry.concept_names[unit[1]]}


def _participant_row(session: Session, artifacts: ArtifactStore, study: Study, participant: Participant,
                     entry: LoadedModel, split: SplitData, base_weight: torch.Tensor,
                     events: dict[int, tuple[int, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "pseudonym": participant.pseudonym, "condition": participant.condition,
        "status": participant_status(study, participant), "joined_at": participant.joined_at,
        "deadline_at": participant.deadline_at, "submitted": participant.submitted_at is not None,
        "submitted_at": participant.submitted_at, "submitted_version": participant.submitted_version,
        "n_events": events.get(participant.id, (0, None))[0], "last_event_at": events.get(participant.id, (0, None))[1],
        "final_version": None, "units": [], "prunes": [], "n_prunes": 0,
        "correct": None, "n": None, "accuracy": None, "delta_vs_base": None,
    }
    if participant.model_id is None:
        return row
    model = history.get_model(session, participant.model_id)
    number = participant.submitted_version or model.head_number
    state = cached_state(artifacts, history.get_version(session, model.id, number))
    units = pruned_units(base_weight, state.tensors["weight"])
    row.update(final_version=number, units=units, prunes=[_unit(entry, u) for u in units], n_prunes=len(units),
               **score(split, state.tensors["weight"], state.tensors["bias"]))
    return row


def study_results(session: Session, svc: ModelService, artifacts: ArtifactStore, study: Study) -> dict[str, Any]:
    """Every number of the study dashboard (and of the export, which reproduces them)."""
    session.commit()  # a read transaction only: end it before the model service takes a connection
    entry, split = target_split(svc, study)
    base_version = history.get_version(session, study.base_model_id, study.base_version)
    base = cached_state(artifacts, base_version)
    base_weight = base.tensors["weight"]
    events = event_counts(session, study.id)
    rows = [_participant_row(session, artifacts, study, p, entry, split, base_weight, events)
            for p in participants(session, study.id)]
    base_score = score(split, base_weight, base.tensors["bias"])
    for row in rows:
        if row["accuracy"] is not None and base_score["accuracy"] is not None:
            row["delta_vs_base"] = row["accuracy"] - base_score["accuracy"]
    submitted = [r for r in rows if r["submitted"]]
    k, k_source = budget_k(study, [r["n_prunes"] for r in submitted])
    found = baselines(entry, split, base, base_version.weights_hash, k, with_head=svc.with_head)
    conditions = {}
    for condition in [c["name"] for c in study.conditions]:
        values = [r["accuracy"] for r in submitted if r["condition"] == condition and r["accuracy"] is not None]
        conditions[condition] = {"n": len(values), "mean": mean(values), "std": sample_std(values),
                                 "min": min(values, default=None), "max": max(values, default=None),
                                 "values": values}
    units = prune_candidates(base_weight)
    return {
        "study_id": study.id, "target_split": study.target_split, "n_target": int(split.cache.labels.numel()),
        "k": k, "k_source": k_source,
        "base": {"version": study.base_version, **base_score},
        "random": {key: value for key, value in found["random"].items() if key != "runs"}
        | {"runs": [{**r, "prunes": [_unit(entry, u) for u in r["prunes"]]} for r in found["random"]["runs"]]},
        "oracle": {**found["oracle"], "prunes": [_unit(entry, u) for u in found["oracle"]["prunes"]],
                   "method": "ml.suggest.greedy_prunes (accuracy) on the target split, one-class prunes"},
        "participants": [{key: value for key, value in r.items() if key != "units"} for r in rows],
        "conditions": conditions,
        "agreement": agreement([set(r["units"]) for r in submitted], units),
    }
