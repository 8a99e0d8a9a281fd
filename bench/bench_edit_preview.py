"""Edit preview: the low-rank update of cached logits vs recomputing them from scratch.

50,000 images, 1,000 concepts, 100 classes, 8 groups; a sparse head (5% non-zero).
Both paths produce the same outputs -- the edited model's report (accuracy, balanced,
per class, per group, worst group) and the flipped predictions against the cached base
model -- and both reuse the cached base predictions and report:

- full: ``Z @ W'.T + b'`` then the metrics;
- incremental: :func:`ml.evaluation.preview_edits`, i.e. ``logits + Z[:, cols] @ dW.T``.
"""

from __future__ import annotations

import torch

from bench import machine, main, median, timed
from ml.editing import Edit, apply_edits
from ml.evaluation import EvalCache, classification_report, preview_edits
from ml.head import SparseLinearHead

N, CONCEPTS, CLASSES, GROUPS = 50_000, 1_000, 100, 8


class _Model:
    """The parts of a PCBM that editing and previews use, without a bank to project with."""

    def __init__(self, head, names, classes):
        self.head, self.classes_ = head, classes
        self.bank = type("Bank", (), {"names": names})()

    def copy(self):
        return _Model(self.head.copy(), self.bank.names, self.classes_)

    def check_fitted(self):
        return None


def setup(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    features_t = torch.randn(CONCEPTS, N, generator=gen)  # standardised scores, concept-major
    weight = torch.randn(CLASSES, CONCEPTS, generator=gen) * (torch.rand(CLASSES, CONCEPTS, generator=gen) < 0.05)
    bias = torch.randn(CLASSES, generator=gen) * 0.1
    logits = torch.addmm(bias, features_t.T, weight.T)
    labels = (logits + 2.0 * torch.randn(N, CLASSES, generator=gen)).argmax(1)
    groups = torch.randint(0, GROUPS, (N,), generator=gen)
    config = {"kind": "sparse_linear_head", "lam": 1e-3, "l1_ratio": 0.99, "standardize": True, "max_iter": 1,
              "tol": 1e-6}
    head = SparseLinearHead.from_state({"weight": weight, "bias": bias, "mean": torch.zeros(CONCEPTS),
                                        "scale": torch.ones(CONCEPTS)}, config)
    names, classes = [f"concept{i}" for i in range(CONCEPTS)], [f"class{i}" for i in range(CLASSES)]
    cache = EvalCache(features_t=features_t, labels=labels, groups=groups, base_logits=logits,
                      base_weight=weight.clone(), base_bias=bias.clone(), mean=head.mean_.clone(),
                      scale=head.scale_.clone(), class_names=classes, group_names=[f"g{i}" for i in range(GROUPS)],
                      concept_names=names)
    return _Model(head, names, classes), cache


def full_preview(cache: EvalCache, new_head: SparseLinearHead) -> dict:
    logits = torch.addmm(new_head.bias_, cache.features, new_head.weight_.T)
    new_pred = logits.argmax(1)
    report = classification_report(new_pred, cache.labels, cache.groups, cache.class_names, cache.group_names)
    flipped = (cache._base_pred != new_pred).nonzero().flatten()
    right_before = cache._base_pred[flipped] == cache.labels[flipped]
    right_after = new_pred[flipped] == cache.labels[flipped]
    return {"after": report, "count": int(flipped.numel()), "newly_correct": int((right_after & ~right_before).sum()),
            "newly_wrong": int((right_before & ~right_after).sum())}


def run(quick: bool = False) -> dict[str, dict]:
    torch.set_num_threads(1)
    repeats = 5 if quick else 9
    model, cache = setup()
    busiest = int((model.head.weight_ != 0).sum(0).argmax())
    edits = {"prune_1": [Edit("prune", f"concept{busiest}")],
             "edits_10": [Edit("prune_normalize" if i % 2 else "scale", f"concept{i * 37}", None,
                               None if i % 2 else 0.5) for i in range(10)]}
    out: dict[str, float | str] = {}
    preview_edits(cache, model, model)  # builds the cached base report once, as a server would
    for label, edit_list in edits.items():
        edited, _ = apply_edits(model, edit_list)
        fast_times, full_times = [], []
        for _ in range(repeats):
            seconds, fast = timed(lambda: preview_edits(cache, model, edited))
            fast_times.append(seconds)
            seconds, slow = timed(lambda: full_preview(cache, edited.head))
            full_times.append(seconds)
        assert fast["flips"]["count"] == slow["count"] and fast["after"]["accuracy"] == slow["after"]["accuracy"]
        ratio = median(fast_times) / median(full_times)
        if label == "prune_1":
            out["ratio_incremental_vs_full"] = ratio
            out["ms_median"] = 1000 * median(fast_times)
            out["ms_median_full"] = 1000 * median(full_times)
        else:
            out[f"ratio_{label}"] = ratio
            out[f"ms_median_{label}"] = 1000 * median(fast_times)
    out["setup"] = (f"{N} images, {CONCEPTS} concepts, {CLASSES} classes, {GROUPS} groups; prune_1 = one concept "
                    f"pruned from every class; median of {repeats}, torch 1 thread")
    out["mode"] = "quick" if quick else "full"
    out["machine"] = machine()
    return {"edit_preview": out}


if __name__ == "__main__":
    main(run)
