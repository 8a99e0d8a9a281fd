"""Suggested edits: proposals computed from labelled data, each a list of ``Edit``s with evidence.

Three sources (docs/suggestions.md defines each statistic precisely):

- :func:`tfti_proposals` -- training-free test-time improvement from a few labelled target
  images: mask concepts that push wrong classes there, amplify discriminative concepts
  that fire more weakly there than on the source split;
- :func:`greedy_prunes` -- greedy forward selection of prunes that maximise a metric on a
  labelled split, every candidate scored by a low-rank update of the cached logits;
- :func:`spurious_ranking` -- concepts whose contribution to a class logit varies with a
  group label (e.g. the background) inside the class.

Everything here is pure: models are never modified, and every proposal only touches the
weights its edits name (``Proposal.edits`` carry ``source``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ml.editing import Edit, apply_edits
from ml.errors import ConfigError, DataError, ShapeError
from ml.evaluation import EvalCache
from ml.head import check_labels

SOURCES = ("tfti", "greedy", "spurious", "user")
METRICS = ("accuracy", "worst_group", "balanced_accuracy")
_CHUNK = 4_000_000  # candidate logits held at once (floats), to bound memory on big splits


@dataclass
class Proposal:
    """One suggested change: the edits that make it, who proposed it and why."""

    source: str  # one of SOURCES
    kind: str  # "mask" | "amplify" | "prune"
    title: str  # one line for people
    edits: list[Edit]
    evidence: dict[str, Any] = field(default_factory=dict)  # JSON-able

    @property
    def concepts(self) -> list[str]:
        return list(dict.fromkeys(e.concept for e in self.edits))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "title": self.title, "concepts": self.concepts,
                "edits": [e.to_dict() for e in self.edits], "evidence": self.evidence}


@dataclass
class Scored:
    """A labelled split as the methods read it: the head's standardised scores and the model's logits."""

    features: torch.Tensor  # (N, C) z = (score - mean) / scale
    logits: torch.Tensor  # (N, K), the PCBM-h residual included
    labels: torch.Tensor  # (N,) long
    groups: torch.Tensor | None = None  # (N,) long indices into group_names
    group_names: list[str] = field(default_factory=list)

    def rows(self, index: torch.Tensor) -> Scored:
        index = torch.as_tensor(index, dtype=torch.long, device=self.labels.device)
        return Scored(self.features[index], self.logits[index], self.labels[index],
                      None if self.groups is None else self.groups[index], list(self.group_names))


def _group_tensor(groups: Any, n: int) -> tuple[torch.Tensor | None, list[str]]:
    if groups is None:
        return None, []
    if isinstance(groups, torch.Tensor):
        groups = groups.long().reshape(-1)
        names = [str(i) for i in range(int(groups.max()) + 1)] if groups.numel() else []
    else:
        if all(g is None for g in groups):
            return None, []
        values = ["(none)" if g is None else str(g) for g in groups]
        names = sorted(set(values))
        groups = torch.tensor([names.index(v) for v in values], dtype=torch.long)
    if groups.shape[0] != n:
        raise ShapeError(f"{groups.shape[0]} group entries for {n} images")
    return groups, names


def pool(parts: Sequence[Scored]) -> Scored:
    """Several scored splits as one (group labels matched by name)."""
    if not parts:
        raise DataError("nothing to pool: no splits given")
    names = sorted({n for p in parts for n in p.group_names}) if all(p.groups is not None for p in parts) else []
    groups = None
    if names:
        groups = torch.cat([torch.tensor([names.index(p.group_names[g]) for g in p.groups.tolist()], dtype=torch.long)
                            for p in parts])
    return Scored(torch.cat([p.features.cpu() for p in parts]), torch.cat([p.logits.cpu() for p in parts]),
                  torch.cat([p.labels.cpu() for p in parts]), groups, names)


def scored(model: Any, data: Any) -> Scored:
    """``data`` as a :class:`Scored` split for ``model``.

    ``data``: a :class:`Scored`; an :class:`~ml.evaluation.EvalCache` built for this model's
    head (its cached logits are reused); an embedded split (``embeddings``, ``labels``,
    ``groups``); or a tuple ``(embeddings, labels[, groups])``.
    """
    if isinstance(data, Scored):
        return data
    if isinstance(data, EvalCache):
        logits, _ = data.logits_for(model)
        return Scored(data.features.cpu(), logits.cpu(), data.labels.cpu(),
                      None if data.groups is None else data.groups.cpu(), list(data.group_names))
    if hasattr(data, "embeddings"):
        embeddings, labels, groups = data.embeddings, data.labels, getattr(data, "groups", None)
    elif isinstance(data, tuple | list):
        embeddings, labels, *rest = data
        groups = rest[0] if rest else None
    else:
        raise ConfigError("expected an embedded split, an EvalCache or (embeddings, labels[, groups])")
    labels = check_labels(labels, embeddings.shape[0], len(model.classes_))
    with torch.no_grad():
        features = model.head.transform(model.concept_scores(embeddings))
        logits = model.decision_function(embeddings)
    group_idx, names = _group_tensor(groups, embeddings.shape[0])
    return Scored(features, logits, labels, group_idx, names)


def sample_shots(labels: torch.Tensor, shots: int, seed: int = 0) -> torch.Tensor:
    """Row indices of ``shots`` images per class (all of a class that has fewer), drawn with ``seed``."""
    if int(shots) < 1:
        raise ConfigError(f"shots must be at least 1, got {shots}")
    labels = torch.as_tensor(labels).cpu().long()
    gen = torch.Generator().manual_seed(int(seed))
    picked = []
    for k in range(int(labels.max()) + 1 if labels.numel() else 0):
        rows = (labels == k).nonzero().flatten()
        order = torch.randperm(rows.numel(), generator=gen)  # drawn for every class, so draws stay aligned
        picked.append(rows[order[: int(shots)]])
    if not picked:
        raise DataError("cannot sample shots from an empty split")
    return torch.cat(picked).sort().values


def cache_rows(cache: EvalCache, rows: torch.Tensor) -> EvalCache:
    """The same cache restricted to some images (e.g. a target split without its shots)."""
    rows = torch.as_tensor(rows, dtype=torch.long).to(cache.labels.device)
    return replace(cache, features_t=cache.features_t[:, rows].contiguous(), labels=cache.labels[rows],
                   groups=None if cache.groups is None else cache.groups[rows],
                   base_logits=cache.base_logits[rows], _base_report=None, _base_pred=None)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits, labels))


def _shot_effect(before: torch.Tensor, after: torch.Tensor, labels: torch.Tensor) -> dict[str, int]:
    """How the change moves each image's margin (true logit minus the best other logit)."""
    def margin(logits: torch.Tensor) -> torch.Tensor:
        true = logits.gather(1, labels[:, None])[:, 0]
        return true - logits.scatter(1, labels[:, None], float("-inf")).amax(1)

    m0, m1 = margin(before), margin(after)
    eps = 1e-6 * (1 + m0.abs())
    right0, right1 = m0 > 0, m1 > 0
    return {"n_images": int(labels.numel()), "margin_up": int((m1 > m0 + eps).sum()),
            "margin_down": int((m1 < m0 - eps).sum()), "fixed": int((right1 & ~right0).sum()),
            "broken": int((right0 & ~right1).sum())}


def _column_delta(weight: torch.Tensor, rows: Sequence[int], column: int, factor: float) -> torch.Tensor:
    """(K,) change of ``weight[:, column]`` when the given rows are multiplied by ``factor``."""
    delta = torch.zeros(weight.shape[0], dtype=weight.dtype)
    idx = torch.as_tensor(list(rows), dtype=torch.long)
    delta[idx] = weight[idx, column] * (factor - 1.0)
    return delta


def _class_stats(z: torch.Tensor, labels: torch.Tensor, n_classes: int):
    """Per (class k, concept i): mean z over k's images, the gap to the other images' mean, and
    the standard errors of both from the pooled within-class variance (NaN where undefined)."""
    onehot = torch.nn.functional.one_hot(labels, n_classes).float()
    n_in = onehot.sum(0)[:, None]
    n_out = z.shape[0] - n_in
    inside = (onehot.T @ z) / n_in.clamp_min(1)
    outside = (z.sum(0)[None] - onehot.T @ z) / n_out.clamp_min(1)
    within = ((z - inside[labels]) ** 2).sum(0) / max(z.shape[0] - int((n_in > 0).sum()), 1)
    sd = within.sqrt()[None].clamp_min(1e-6)
    nan = torch.tensor(float("nan"))
    gap = torch.where((n_in > 0) & (n_out > 0), inside - outside, nan)
    se_gap = sd * (1 / n_in.clamp_min(1) + 1 / n_out.clamp_min(1)).sqrt()
    return torch.where(n_in > 0, inside, nan), gap, sd / n_in.clamp_min(1).sqrt(), se_gap


def tfti_proposals(model: Any, source: Any, target: Any, *, max_mask: int = 5, max_amplify: int = 5,
                   min_harm: float = 0.0, scope: str = "class", scale_range: tuple[float, float] = (1.0, 3.0),
                   min_ratio: float = 1.1, min_source_gap: float = 0.5, min_z: float = 3.0,
                   verify: bool = True, max_source_drop: float | None = 0.015) -> list[Proposal]:
    """Training-free test-time improvement from a few labelled target images.

    ``source``: the split the model was trained on (e.g. train); ``target``: the labelled
    target shots (anything :func:`scored` takes). z are the head's standardised scores;
    per class k and concept i, ``mu[k, i]`` is the mean z over k's images and ``gap[k, i]``
    that mean minus the mean over the other classes' images, on the source (``_s``) and on
    the shots (``_t``); their differences are measured in standard errors (each split's
    pooled within-class variance over its image counts, source and target combined).

    1. *mask* misactivated concepts. ``harm[k, i] = W[k, i] * mean_n (p_nk - y_nk) z_ni``
       is the first-order drop of the shots' mean cross-entropy when ``W[k, i]`` is set to
       0 (positive: the concept raises class k on images where k is wrong, or lowers it
       where k is right). A weight is misactivated when ``harm > min_harm``, the shots'
       gap no longer points the way the weight does (``W * gap_t <= 0``) and the gap moved
       against the weight by at least ``min_z`` standard errors. Concepts are taken most
       harmful first (harm recomputed after each kept mask) and masked for those classes
       (``scope="class"``; every class when all its weights qualify) or for every class
       (``"all"``).
    2. *amplify* under-activated discriminative concepts: ``W[y, i] > 0``, ``mu_s > 0``,
       ``gap_s >= min_source_gap`` (discriminative on the source), ``gap_t > 0`` (still
       pointing to y on the target), ``mu_t`` below ``mu_s`` by at least ``min_z`` standard
       errors and ``mu_s / mu_t >= min_ratio`` (``mu_t <= 0`` counts as infinite) -> scale
       ``W[y, i]`` by ``mu_s / mu_t`` clipped to ``scale_range``; largest logit deficit
       ``W * (mu_s - mu_t)`` first.

    A candidate is also refused when the edits kept so far plus it would lower accuracy
    on the source split by more than ``max_source_drop`` (an in-distribution budget; 1.0
    or None: no budget).
    With ``verify`` a candidate is kept only if it lowers the shots' cross-entropy given
    the ones kept before it (exact, by a rank-one update of the logits). At most
    ``max_mask`` masks then ``max_amplify`` amplifications; each proposal is one concept,
    its evidence says on how many shots it pushes which way and what it does to their
    margins (``shots``: margin_up/down, fixed/broken).
    """
    if scope not in ("class", "all"):
        raise ConfigError(f"scope must be 'class' or 'all', got {scope!r}")
    low, high = (float(v) for v in scale_range)
    if not 1.0 <= low <= high:
        raise ConfigError(f"scale_range must satisfy 1 <= low <= high, got {scale_range}")
    src, tgt = scored(model, source), scored(model, target)
    weight = model.head.weight_.cpu()
    n_classes = weight.shape[0]
    z, labels, logits = tgt.features.cpu(), tgt.labels.cpu(), tgt.logits.cpu()
    names, classes = list(model.bank.names), list(model.classes_)
    if z.shape[0] == 0:
        raise DataError("TF-TTI needs at least one labelled target image")
    onehot = torch.nn.functional.one_hot(labels, n_classes).float()
    push = weight[None] * z[:, None, :]  # (N, K, C): W[k, i] * z_ni
    current, live = logits.clone(), weight.clone()
    src_z, src_labels, src_logits = src.features.cpu(), src.labels.cpu(), src.logits.cpu()
    src_acc = float((src_logits.argmax(1) == src_labels).float().mean())

    def acceptable(after: torch.Tensor, before: torch.Tensor, src_after: torch.Tensor) -> bool:
        if verify and not _ce(after, labels) < _ce(before, labels):
            return False
        drop = src_acc - float((src_after.argmax(1) == src_labels).float().mean())
        return max_source_drop is None or drop <= max_source_drop

    # (K, C) class statistics: mean z over class k, its gap to the other classes, standard errors
    mu_t, gap, se_t, se_gap_t = _class_stats(z, labels, n_classes)
    mu_s, src_gap, se_s, se_gap_s = _class_stats(src.features.cpu(), src.labels.cpu(), n_classes)
    se_mean, se_gap = (se_t ** 2 + se_s ** 2).sqrt(), (se_gap_t ** 2 + se_gap_s ** 2).sqrt()
    # how many standard errors the concept's separation of class k weakened, in its weight's direction
    shift = torch.sign(weight) * (src_gap - gap) / se_gap
    proposals: list[Proposal] = []
    remaining = set(range(weight.shape[1]))
    while len(proposals) < int(max_mask) and remaining:
        # the first-order effect of each mask given the masks kept so far
        harm = live * ((torch.softmax(current, 1) - onehot).T @ z) / z.shape[0]  # (K, C)
        candidates = []
        for i in sorted(remaining):
            used = [k for k in range(n_classes) if live[k, i] != 0]
            rows = [k for k in used if harm[k, i] > min_harm and live[k, i] * gap[k, i] <= 0
                    and shift[k, i] >= min_z]
            if scope == "all":
                rows = used if rows and float(harm[used, i].sum()) > min_harm else []
            if rows:
                candidates.append((float(harm[rows, i].sum()), i, rows))
        candidates.sort(key=lambda item: (-item[0], item[1]))
        chosen = None
        for total, i, rows in candidates:
            remaining.discard(i)  # tried: kept now, or refused by the shots given the masks kept so far
            change = torch.zeros(n_classes)
            change[rows] = live[rows, i]
            after = current - z[:, i:i + 1] * change[None]
            src_after = src_logits - src_z[:, i:i + 1] * change[None]
            if acceptable(after, current, src_after):
                chosen = (total, i, rows, after, src_after)
                break
        if chosen is None:
            break
        total, i, rows, after, src_logits = chosen
        wrong = (push[:, rows, i] > 0) & (onehot[:, rows] == 0)  # raises a class that is wrong here
        against = (push[:, rows, i] < 0) & (onehot[:, rows] == 1)  # lowers the true class
        every = len(rows) == int((weight[:, i] != 0).sum())
        edits = ([Edit("prune", names[i], None, source="tfti")] if every
                 else [Edit("prune", names[i], classes[k], source="tfti") for k in rows])
        evidence = {
            "harm": total, "harm_by_class": {classes[k]: float(harm[k, i]) for k in rows},
            "shift_z": {classes[k]: float(shift[k, i]) for k in rows},
            "raises_wrong_class": {classes[k]: int(wrong[:, j].sum()) for j, k in enumerate(rows)},
            "lowers_true_class": {classes[k]: int(against[:, j].sum()) for j, k in enumerate(rows)},
            "images_pushed_wrong": int((wrong | against).any(1).sum()),
            "shots": _shot_effect(current, after, labels),
        }
        scope_words = "every class" if every else ", ".join(classes[k] for k in rows)
        title = (f"mask “{names[i]}” for {scope_words}: it pushes wrong classes on "
                 f"{evidence['images_pushed_wrong']} of {z.shape[0]} target images")
        proposals.append(Proposal("tfti", "mask", title, edits, evidence))
        current = after
        live[rows, i] = 0.0

    masked = {(e.class_name, e.concept) for p in proposals for e in p.edits}
    masked_all = {c for cls, c in masked if cls is None}
    amplify = []
    for y in sorted(set(labels.tolist())):
        for i in range(weight.shape[1]):
            if weight[y, i] <= 0 or names[i] in masked_all or (classes[y], names[i]) in masked:
                continue
            # discriminative for y on the source, still pointing to y on the target, but weaker
            # there by at least min_z standard errors
            m_s, m_t = float(mu_s[y, i]), float(mu_t[y, i])
            if not (m_s > 0 and src_gap[y, i] >= min_source_gap and gap[y, i] > 0
                    and (m_s - m_t) / float(se_mean[y, i]) >= min_z):
                continue
            ratio = m_s / m_t if m_t > 0 else float("inf")
            if ratio < min_ratio:
                continue
            deficit = float(weight[y, i]) * (m_s - m_t)
            amplify.append((deficit, y, i, ratio, min(max(ratio, low), high), m_s, m_t))
    amplify.sort(key=lambda item: (-item[0], item[1], item[2]))
    kept = 0
    for deficit, y, i, ratio, factor, mu_s_i, mu_t_i in amplify:
        if kept >= max_amplify:
            break
        delta = _column_delta(weight, [y], i, factor)[None]
        after, src_after = current + z[:, i:i + 1] * delta, src_logits + src_z[:, i:i + 1] * delta
        if not acceptable(after, current, src_after):
            continue
        in_tgt = labels == y
        below = int((z[in_tgt, i] < mu_s_i).sum())
        evidence = {"class": classes[y], "source_mean": mu_s_i, "target_mean": mu_t_i,
                    "shift_z": (mu_s_i - mu_t_i) / float(se_mean[y, i]),
                    "ratio": ratio if ratio != float("inf") else None, "factor": factor, "logit_deficit": deficit,
                    "images_under_activated": below, "images_of_class": int(in_tgt.sum()),
                    "shots": _shot_effect(current, after, labels)}
        proposals.append(Proposal(
            "tfti", "amplify", f"amplify “{names[i]}” for {classes[y]} ×{factor:.2f}: weaker on {below} of "
            f"{int(in_tgt.sum())} target {classes[y]} images than on the source",
            [Edit("scale", names[i], classes[y], factor, source="tfti")], evidence))
        current, src_logits = after, src_after
        kept += 1
    return proposals


def _metric_values(logits: torch.Tensor, labels: torch.Tensor, group_onehot: torch.Tensor | None,
                   class_onehot: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy, worst-group and balanced accuracy of a batch of logits (B, N, K), each (B,)."""
    correct = (logits.argmax(-1) == labels).float()  # (B, N)
    out = {"accuracy": correct.mean(1)}
    per_class = (correct @ class_onehot) / class_onehot.sum(0).clamp_min(1)
    present = class_onehot.sum(0) > 0
    out["balanced_accuracy"] = per_class[:, present].mean(1)
    if group_onehot is not None:
        filled = group_onehot.sum(0) > 0
        per_group = (correct @ group_onehot) / group_onehot.sum(0).clamp_min(1)
        out["worst_group"] = per_group[:, filled].amin(1)
    lse = torch.logsumexp(logits, -1)
    out["ce"] = (lse - logits.gather(-1, labels.expand(logits.shape[0], -1)[..., None])[..., 0]).mean(1)
    return out


def _report_value(report: dict[str, Any], metric: str) -> float:
    if metric == "worst_group":
        return report["worst_group"]["accuracy"] if report["worst_group"] else float("nan")
    return report[metric]


def greedy_prunes(model: Any, cache: EvalCache, k: int = 5, metric: str = "accuracy",
                  candidates: Sequence[str | tuple[str, str | None]] | None = None,
                  per_class: bool = False) -> list[dict[str, Any]]:
    """Greedy forward selection of up to ``k`` prunes maximising ``metric`` on ``cache``'s split.

    Stable signature (the user-study oracle baseline calls it).

    Parameters
    ----------
    model : the PCBM or PCBM-h ``cache`` was built for (its head is the starting point).
    cache : an :class:`~ml.evaluation.EvalCache` of a labelled split (with groups for
        ``metric="worst_group"``).
    k : at most this many prunes.
    metric : "accuracy", "worst_group" (worst-group accuracy) or "balanced_accuracy".
    candidates : concept names (pruned for every class) or ``(concept, class or None)``
        pairs; default: every concept with a non-zero weight (and with ``per_class``,
        also every non-zero (concept, class) weight on its own).
    per_class : also consider pruning one class's weight of a concept.

    Each step scores every remaining candidate by a low-rank update of the current
    logits, takes the best (ties: higher accuracy, then lower cross-entropy, then the
    earlier candidate) and stops early when no candidate raises (metric, accuracy)
    lexicographically. Returns one dict per step: ``step`` (1-based), ``edit`` (an
    :class:`Edit`, source "greedy"), ``concept``, ``class_name``, ``before`` and ``metric``
    (the metric before and after the step), ``accuracy``, ``worst_group_accuracy``,
    ``balanced_accuracy`` after it. Metrics after a step are computed through
    ``cache.logits_for`` on the edited model: the very numbers ``preview_edits`` shows.
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "worst_group" and cache.groups is None:
        raise ConfigError("metric 'worst_group' needs a split with group labels")
    if int(k) < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    names, classes = list(model.bank.names), list(model.classes_)
    weight = model.head.weight_
    pool: list[tuple[int, int | None]] = []
    if candidates is None:
        pool = [(i, None) for i in range(len(names)) if (weight[:, i] != 0).any()]
        if per_class:
            pool += [(i, r) for i in range(len(names)) for r in range(len(classes)) if weight[r, i] != 0]
    else:
        for item in candidates:
            concept, class_name = (item, None) if isinstance(item, str) else item
            if concept not in names:
                raise ConfigError(f"unknown concept {concept!r}: it is not in this model's concept bank")
            if class_name is not None and class_name not in classes:
                raise ConfigError(f"unknown class {class_name!r}")
            pool.append((names.index(concept), None if class_name is None else classes.index(class_name)))
    device = cache.features_t.device
    labels = cache.labels
    class_onehot = torch.nn.functional.one_hot(labels, len(classes)).float()
    group_onehot = None
    if cache.groups is not None:
        group_onehot = torch.nn.functional.one_hot(cache.groups, max(len(cache.group_names), 1)).float()
    current_model = model
    logits, _ = cache.logits_for(model)
    report = cache.report(logits)
    best_key = (_report_value(report, metric), report["accuracy"])
    steps: list[dict[str, Any]] = []
    while len(steps) < int(k) and pool:
        w = current_model.head.weight_.to(device)
        n, classes_n = logits.shape
        chunk = max(1, _CHUNK // max(1, n * classes_n))
        scores = []
        for start in range(0, len(pool), chunk):
            part = pool[start:start + chunk]
            cols = torch.tensor([i for i, _ in part], device=device)
            mask = torch.ones(len(part), classes_n, device=device)
            for b, (_, row) in enumerate(part):
                if row is not None:
                    mask[b] = 0
                    mask[b, row] = 1
            delta = (w[:, cols].T * mask)[:, None, :] * cache.features_t[cols][:, :, None]  # (B, N, K)
            values = _metric_values(logits[None] - delta, labels, group_onehot, class_onehot)
            scores += list(zip(values[metric].tolist(), values["accuracy"].tolist(), values["ce"].tolist(), strict=False))
        order = sorted(range(len(pool)), key=lambda b: (-scores[b][0], -scores[b][1], scores[b][2], b))
        best = order[0]
        if not (scores[best][0], scores[best][1]) > best_key:
            break
        i, row = pool.pop(best)
        edit = Edit("prune", names[i], None if row is None else classes[row], source="greedy")
        current_model, _ = apply_edits(current_model, [edit])
        logits, _ = cache.logits_for(current_model)
        report = cache.report(logits)
        after = _report_value(report, metric)
        steps.append({"step": len(steps) + 1, "edit": edit, "concept": edit.concept, "class_name": edit.class_name,
                      "before": best_key[0], "metric": after, "accuracy": report["accuracy"],
                      "worst_group_accuracy": report["worst_group"]["accuracy"] if report["worst_group"] else None,
                      "balanced_accuracy": report["balanced_accuracy"]})
        best_key = (after, report["accuracy"])
        # candidates whose weights are all zero now would change nothing
        new_weight = current_model.head.weight_
        pool = [(c, r) for c, r in pool
                if (new_weight[:, c].ne(0).any() if r is None else bool(new_weight[r, c] != 0))]
    return steps


def greedy_proposals(steps: list[dict[str, Any]], metric: str = "accuracy") -> list[Proposal]:
    """The greedy path as proposals: one per step, in order (each assumes the earlier ones)."""
    return [Proposal("greedy", "prune", f"step {s['step']}: prune “{s['concept']}”"
                     + (f" for {s['class_name']}" if s["class_name"] else "") + f" ({metric} "
                     f"{s['before']:.3f} → {s['metric']:.3f})", [s["edit"]],
                     {"step": s["step"], "metric": metric, "before": s["before"], "after": s["metric"],
                      "accuracy": s["accuracy"], "worst_group_accuracy": s["worst_group_accuracy"]})
            for s in steps]


def spurious_ranking(model: Any, data: Any, min_group_size: int = 1) -> list[dict[str, Any]]:
    """Rank every concept by how much its contribution to a class logit follows the group label.

    ``data``: a labelled split with group labels (anything :func:`scored` takes), or a
    list of them, pooled (:func:`pool`): the more splits, the more images of each class
    away from its usual group, which is what the statistic needs. Within
    each class k (true labels), images in groups with at least ``min_group_size`` images of
    k, the contribution ``c_n = W[k, i] * z_ni`` splits into a between-group and a
    within-group part. With ``SSB[k, i] = sum_g n_kg (mean_kg c - mean_k c)^2`` and
    ``SST[k, i] = sum_n (c_n - mean_k c)^2``:

    - ``score`` = ``sqrt(sum_k SSB[k, i] / N)``: the RMS swing of the concept's contribution
      to the class logits explained by the group inside a class, in logit units (so
      ``|W|`` weights it; a concept with no weight scores 0) -- the ranking key;
    - ``eta2`` = ``sum_k SSB / sum_k SST``: the pooled correlation ratio (share of the
      within-class variance of the contribution the group explains), in [0, 1];
    - ``class_eta2``: share of the concept score's variance over all images that the class
      explains (for contrast: a class concept has a high class_eta2 and a low eta2).

    Returns one dict per concept, best first: ``rank`` (1-based), ``concept``, ``index``,
    ``score``, ``eta2``, ``class_eta2`` and ``per_class`` rows ``{class, weight, eta2, swing,
    n, top_group, top_group_mean, rest_mean}`` for the classes that use the concept.
    """
    split = pool([scored(model, d) for d in data]) if isinstance(data, list) else scored(model, data)
    if split.groups is None:
        raise DataError("the spurious-concept ranking needs group labels (e.g. the background) for the split")
    z, labels, groups = split.features.cpu(), split.labels.cpu(), split.groups.cpu()
    weight = model.head.weight_.cpu()
    names, classes = list(model.bank.names), list(model.classes_)
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    ssb = torch.zeros(weight.shape)
    sst = torch.zeros(weight.shape)
    counts = torch.zeros(weight.shape[0], dtype=torch.long)
    top: dict[tuple[int, int], tuple[int, float, float]] = {}
    for k in range(weight.shape[0]):
        rows = labels == k
        sizes = torch.bincount(groups[rows], minlength=n_groups)
        keep = rows & (sizes[groups] >= int(min_group_size))
        if int(keep.sum()) < 2 or int((sizes >= int(min_group_size)).sum()) < 2:
            continue
        zk, gk = z[keep], groups[keep]
        onehot = torch.nn.functional.one_hot(gk, n_groups).float()
        n_g = onehot.sum(0)
        filled = n_g > 0
        means = (onehot.T @ zk)[filled] / n_g[filled, None]  # (G', C) group means of z
        overall = zk.mean(0)
        ssb_z = (n_g[filled, None] * (means - overall) ** 2).sum(0)
        sst_z = ((zk - overall) ** 2).sum(0)
        # remove what chance alone puts between groups: (G - 1) times the within-group mean square
        n_k, g_k = int(keep.sum()), int(filled.sum())
        msw = (sst_z - ssb_z) / max(n_k - g_k, 1)
        ssb_z = (ssb_z - (g_k - 1) * msw).clamp_min(0.0)
        ssb[k], sst[k] = weight[k] ** 2 * ssb_z, weight[k] ** 2 * sst_z
        counts[k] = int(keep.sum())
        group_ids = filled.nonzero().flatten()
        contribution = weight[k][None] * means  # (G', C)
        best = contribution.argmax(0)
        for i in weight[k].nonzero().flatten().tolist():
            g = int(best[i])
            rest = zk[gk != group_ids[g], i]
            top[(k, i)] = (int(group_ids[g]), float(contribution[g, i]),
                           float(weight[k, i] * rest.mean()) if rest.numel() else float("nan"))
    total = max(int(counts.sum()), 1)
    score = (ssb.sum(0) / total).sqrt()
    eta2 = torch.where(sst.sum(0) > 0, ssb.sum(0) / sst.sum(0).clamp_min(1e-30), torch.zeros(()))
    # class association of the raw standardised score, over every image
    class_onehot = torch.nn.functional.one_hot(labels, weight.shape[0]).float()
    n_k = class_onehot.sum(0)
    filled = n_k > 0
    class_means = (class_onehot.T @ z)[filled] / n_k[filled, None]
    overall = z.mean(0)
    between = (n_k[filled, None] * (class_means - overall) ** 2).sum(0)
    spread = ((z - overall) ** 2).sum(0)
    class_eta2 = torch.where(spread > 0, between / spread.clamp_min(1e-30), torch.zeros(()))
    out = []
    for i, name in enumerate(names):
        per_class = []
        for k in range(weight.shape[0]):
            if weight[k, i] == 0 or counts[k] == 0:
                continue
            g, top_mean, rest_mean = top[(k, i)]
            per_class.append({"class": classes[k], "weight": float(weight[k, i]),
                              "eta2": float(ssb[k, i] / sst[k, i]) if sst[k, i] > 0 else 0.0,
                              "swing": float((ssb[k, i] / counts[k]).sqrt()), "n": int(counts[k]),
                              "top_group": split.group_names[g] if g < len(split.group_names) else str(g),
                              "top_group_mean": top_mean, "rest_mean": rest_mean})
        per_class.sort(key=lambda row: -row["swing"])
        out.append({"concept": name, "index": i, "score": float(score[i]), "eta2": float(eta2[i]),
                    "class_eta2": float(class_eta2[i]), "per_class": per_class})
    out.sort(key=lambda row: (-row["score"], -row["eta2"], row["index"]))
    for rank, row in enumerate(out, 1):
        row["rank"] = rank
    return out


def spurious_proposals(ranking: list[dict[str, Any]], top: int = 5, min_score: float = 0.0) -> list[Proposal]:
    """Prune (for every class) the ``top`` concepts of a :func:`spurious_ranking` scoring above ``min_score``."""
    proposals = []
    for row in ranking:
        if len(proposals) >= int(top) or row["score"] <= min_score:
            break
        strongest = row["per_class"][0] if row["per_class"] else None
        why = (f"; in {strongest['class']} it adds {strongest['top_group_mean']:+.2f} on {strongest['top_group']} "
               f"vs {strongest['rest_mean']:+.2f} elsewhere" if strongest else "")
        proposals.append(Proposal(
            "spurious", "prune", f"prune “{row['concept']}” (rank {row['rank']}, group explains "
            f"{row['eta2']:.0%} of its within-class contribution{why})",
            [Edit("prune", row["concept"], None, source="spurious")],
            {key: row[key] for key in ("rank", "score", "eta2", "class_eta2", "per_class")}))
    return proposals


def extend_cache(cache: EvalCache, base: Any, new: Any, embeddings: torch.Tensor) -> tuple[EvalCache, Any]:
    """A cache for ``new`` = ``base`` plus appended concepts (``ml.editing.add_text_concept``),
    without rebuilding: only the new columns' scores are computed from ``embeddings`` (the
    split's, in the cache's row order). Returns the extended cache and ``base`` padded with
    zero weights for the new concepts, to pass to ``preview_edits(cache, padded, new)``.
    """
    from ml.pcbm import PCBM, PCBMHybrid

    old, extra = len(base.bank), len(new.bank) - len(base.bank)
    if extra < 1 or new.bank.names[:old] != base.bank.names:
        raise ConfigError("the new model must be the base model with concepts appended")
    if embeddings.shape[0] != cache.labels.shape[0]:
        raise ShapeError(f"{embeddings.shape[0]} embeddings for a split of {cache.labels.shape[0]} images")
    head = new.head
    added = new.bank.subset(new.bank.names[old:])
    with torch.no_grad():
        z_new = (added.project(embeddings) - head.mean_[old:]) / head.scale_[old:]
    padded_head = head.copy()
    padded_head.weight_ = torch.cat([base.head.weight_, torch.zeros(base.head.weight_.shape[0], extra)], 1)
    padded_head.bias_ = base.head.bias_.clone()
    pcbm = PCBM(new.bank, padded_head, list(base.classes_))
    padded = base.copy(pcbm) if isinstance(base, PCBMHybrid) else pcbm
    device = cache.features_t.device
    extended = replace(
        cache, features_t=torch.cat([cache.features_t, z_new.T.to(device)]).contiguous(),
        base_weight=padded_head.weight_.to(device), mean=head.mean_.clone(), scale=head.scale_.clone(),
        concept_names=list(new.bank.names), _base_report=None, _base_pred=None)
    return extended, padded
