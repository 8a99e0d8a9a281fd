"""Sparse head training: our FISTA head vs scikit-learn's SGDClassifier (the published recipe).

Both get the SAME synthetic concept scores: 10 classes whose prototypes raise a few
characteristic concepts, correlated (low-rank) plus independent noise, and per-concept
offsets and scales like raw CLIP concept scores. sklearn gets a StandardScaler in front
(its timing includes it, as ours includes our standardisation); the penalty is the same
(alpha = lam, l1_ratio = 0.99).
"""

from __future__ import annotations

import numpy as np
import torch

from bench import machine, main, median, timed

LAM = 1e-3


def synthetic_scores(n: int, concepts: int, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(classes, concepts)) * 0.3
    for k in range(classes):
        prototypes[k, rng.choice(concepts, max(4, concepts // 15), replace=False)] += 1.0
    mixing = rng.normal(size=(concepts, 8))
    labels = rng.integers(0, classes, n)
    latent = prototypes[labels] + rng.normal(size=(n, 8)) @ mixing.T * 0.5 + rng.normal(size=(n, concepts)) * 1.5
    scores = rng.uniform(1.5, 2.5, concepts) + rng.uniform(0.2, 0.6, concepts) * latent
    return scores.astype(np.float32), labels


def run(quick: bool = False) -> dict[str, dict]:
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ml.head import SparseLinearHead

    torch.set_num_threads(1)
    n_train, concepts, repeats = (5000, 100, 3) if quick else (20000, 300, 3)
    scores, labels = synthetic_scores(n_train + n_train // 2, concepts)
    train_x, train_y, test_x, test_y = scores[:n_train], labels[:n_train], scores[n_train:], labels[n_train:]
    train_t, train_yt, test_t = torch.from_numpy(train_x), torch.from_numpy(train_y), torch.from_numpy(test_x)

    ours_times, sk_times, ours_acc, sk_acc, iters = [], [], [], [], []
    for rep in range(repeats):  # interleaved, so both see the same machine load
        seconds, head = timed(lambda: SparseLinearHead(lam=LAM, l1_ratio=0.99).fit(train_t, train_yt))
        ours_times.append(seconds)
        ours_acc.append(float((head.predict(test_t).numpy() == test_y).mean()))
        iters.append(head.n_iter_)
        model = make_pipeline(StandardScaler(), SGDClassifier(loss="log_loss", penalty="elasticnet", alpha=LAM,
                                                              l1_ratio=0.99, max_iter=10000, random_state=rep))
        seconds, model = timed(lambda: model.fit(train_x, train_y))
        sk_times.append(seconds)
        sk_acc.append(float(model.score(test_x, test_y)))
    ours_s, sk_s = median(ours_times), median(sk_times)
    return {"head_training": {
        "speedup_vs_sklearn": sk_s / ours_s,
        "acc_ours": median(ours_acc),
        "acc_sklearn": median(sk_acc),
        "seconds_ours": ours_s,
        "seconds_sklearn": sk_s,
        "n_iter_ours": int(median(iters)),
        "sparsity_ours": float((head.weight_ == 0).float().mean()),
        "setup": f"{n_train} train / {n_train // 2} test images, {concepts} concepts, 10 classes, lam={LAM}, "
                 f"median of {repeats}, torch 1 thread",
        "mode": "quick" if quick else "full",
        "machine": machine(),
    }}


if __name__ == "__main__":
    main(run)
