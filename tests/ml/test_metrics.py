import math

import numpy as np
import pytest
import torch

from ml.errors import DataError, ShapeError
from ml.metrics import (
    accuracy,
    auroc,
    balanced_accuracy,
    class_auroc,
    concept_auroc,
    head_sparsity,
    per_class_accuracy,
    per_group_accuracy,
    worst_group_accuracy,
)

sk_metrics = pytest.importorskip("sklearn.metrics")


def test_accuracy_family():
    preds = torch.tensor([0, 1, 1, 2, 2, 0])
    labels = torch.tensor([0, 1, 2, 2, 0, 0])
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    logits = torch.nn.functional.one_hot(preds, 4).float()
    assert accuracy(logits, labels) == pytest.approx(4 / 6)
    per_class = per_class_accuracy(preds, labels, n_classes=4)
    assert per_class[:3].tolist() == pytest.approx([2 / 3, 1.0, 0.5]) and math.isnan(per_class[3])
    assert balanced_accuracy(preds, labels, 4) == pytest.approx(
        sk_metrics.balanced_accuracy_score(labels.numpy(), preds.numpy()))
    assert per_group_accuracy(preds, labels, groups).tolist() == pytest.approx([1.0, 1 / 3, 1.0])
    assert worst_group_accuracy(preds, labels, groups, n_groups=4) == (1, pytest.approx(1 / 3))
    with pytest.raises(ShapeError):
        accuracy(preds, labels[:3])


def test_auroc_matches_sklearn_with_ties():
    gen = np.random.default_rng(0)
    scores = gen.integers(0, 5, size=300).astype(float)  # many ties
    targets = (gen.random(300) < 0.3 + 0.1 * scores).astype(int)
    expected = sk_metrics.roc_auc_score(targets, scores)
    assert auroc(torch.tensor(scores), torch.tensor(targets)) == pytest.approx(expected, abs=1e-9)
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([0, 1])) == 1.0
    assert auroc(torch.tensor([1.0, 1.0]), torch.tensor([0, 1])) == 0.5
    with pytest.raises(DataError, match="positive and one negative"):
        auroc(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))


def test_concept_auroc_per_column():
    gen = np.random.default_rng(1)
    scores = gen.normal(size=(200, 5)).round(1)
    present = gen.random((200, 5)) < 0.4
    scores[present] += np.arange(5)[np.nonzero(present)[1]] * 0.5
    present[:, 4] = False  # no positives: NaN
    got = concept_auroc(torch.tensor(scores, dtype=torch.float32), torch.tensor(present))
    for c in range(4):
        assert float(got[c]) == pytest.approx(sk_metrics.roc_auc_score(present[:, c], scores[:, c].astype(np.float32)),
                                              abs=1e-6)
    assert math.isnan(float(got[4]))
    logits = torch.tensor(scores[:, :3], dtype=torch.float32)
    labels = torch.tensor(gen.integers(0, 3, size=200))
    per_class = class_auroc(logits, labels)
    for k in range(3):
        assert float(per_class[k]) == pytest.approx(
            sk_metrics.roc_auc_score((labels == k).numpy(), logits[:, k].numpy()), abs=1e-6)


def test_head_sparsity():
    weight = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, -1.0]])
    assert head_sparsity(weight) == {"sparsity": 5 / 8, "nonzeros": 3, "nonzeros_per_class": 1.5,
                                     "concepts_used": 2}
