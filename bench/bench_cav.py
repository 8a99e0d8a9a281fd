"""Concept activation vectors: our batched SMO vs one sklearn SVC per concept and C.

Synthetic CLIP-like embeddings (d=512, a shared mean direction, per-concept directions of
varying strength); 100 positives and 100 negatives per concept, half held out, the
C grid (0.001, 0.01, 0.1, 1, 10) with the C chosen on held-out accuracy (ties to the
smaller C) -- the same splits and the same selection rule for both. Our timing is
``learn_cav_bank`` end to end (validation, splitting, all fits, selection); sklearn's
counts only its fits and scoring (splits are prepared outside the clock).
"""

from __future__ import annotations

import numpy as np
import torch

from bench import machine, main, median, timed

GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


def synthetic_examples(concepts: int, per_class: int = 100, dim: int = 512, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, generator=gen) * 0.5
    positives, negatives = {}, {}
    for i in range(concepts):
        direction = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
        strength = 0.2 + 1.8 * torch.rand(1, generator=gen).item()
        centre = shared * 3 + torch.randn(dim, generator=gen) * 0.2
        x = centre + 0.4 * torch.randn(2 * per_class, dim, generator=gen)
        x[:per_class] += strength * direction
        positives[f"concept{i}"], negatives[f"concept{i}"] = x[:per_class], x[per_class:]
    return positives, negatives


def sklearn_bank(splits):
    from sklearn.svm import SVC

    accs = []
    for train_x, train_y, held_x, held_y in splits:
        best = -1.0
        for c in GRID:  # ascending: a strict improvement is needed to move to a larger C
            acc = SVC(kernel="linear", C=c).fit(train_x, train_y).score(held_x, held_y)
            best = max(best, acc)
        accs.append(best)
    return accs


def run(quick: bool = False) -> dict[str, dict]:
    from ml import concepts as cav

    torch.set_num_threads(1)
    count, repeats = (112, 3) if quick else (300, 5)  # 112 = the CUB attribute bank
    positives, negatives = synthetic_examples(count)
    splits = []
    for name in positives:  # the library's own seeded split, so both solve identical problems
        gen = torch.Generator().manual_seed(cav._split_seed(0, name))
        pos_train, pos_held = cav._split(positives[name], 0.5, gen)
        neg_train, neg_held = cav._split(negatives[name], 0.5, gen)
        splits.append((torch.cat([pos_train, neg_train]).double().numpy(),
                       np.r_[np.ones(len(pos_train)), -np.ones(len(neg_train))],
                       torch.cat([pos_held, neg_held]).double().numpy(),
                       np.r_[np.ones(len(pos_held)), -np.ones(len(neg_held))]))
    ours_times, sk_times = [], []
    for _ in range(repeats):
        seconds, bank = timed(lambda: cav.learn_cav_bank(positives, negatives, c_grid=GRID))
        ours_times.append(seconds)
        seconds, sk_accs = timed(lambda: sklearn_bank(splits))
        sk_times.append(seconds)
    ours_accs = [info["heldout_acc"] for info in bank.info]
    ours_s, sk_s = median(ours_times), median(sk_times)
    return {"cav_learning": {
        "speedup_vs_sklearn": sk_s / ours_s,
        "acc_ours": float(np.mean(ours_accs)),
        "acc_sklearn": float(np.mean(sk_accs)),
        "max_abs_acc_diff_per_concept": float(np.max(np.abs(np.array(ours_accs) - np.array(sk_accs)))),
        "seconds_ours": ours_s,
        "seconds_sklearn": sk_s,
        "setup": f"{count} concepts x 100 pos + 100 neg (half held out), d=512, C grid {list(GRID)}, "
                 f"median of {repeats}, torch 1 thread",
        "mode": "quick" if quick else "full",
        "machine": machine(),
    }}


if __name__ == "__main__":
    main(run)
