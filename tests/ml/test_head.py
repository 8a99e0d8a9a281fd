import pytest
import torch

from ml.errors import DataError, NotFittedError, ShapeError
from ml.head import SparseLinearHead, select_lambda


def planted(seed=0, concepts=30, classes=4, n=4000):
    """Scores whose labels come from a sparse softmax model: 3 concepts per class."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.zeros(classes, concepts)
    for k in range(classes):
        weight[k, 3 * k:3 * k + 3] = torch.tensor([3.0, -2.5, 2.0])
    z = torch.randn(2 * n, concepts, generator=gen)
    labels = torch.multinomial(torch.softmax(z @ weight.T, 1), 1, generator=gen).squeeze(1)
    scores = 2.0 * z + 1.0  # raw scores: shifted and scaled, as concept scores are
    return scores[:n], labels[:n], scores[n:], labels[n:], weight, z[n:]


def test_recovers_a_planted_sparse_solution():
    train_x, train_y, test_x, test_y, weight, test_z = planted()
    head = SparseLinearHead(lam=0.01).fit(train_x, train_y)
    assert head.converged_ and head.weight_.shape == (4, 30)
    support = head.weight_.abs() > 0.05
    assert torch.equal(support, weight != 0)
    assert torch.equal(torch.sign(head.weight_[support]), torch.sign(weight[weight != 0]))
    bayes = float(((test_z @ weight.T).argmax(1) == test_y).float().mean())
    assert float((head.predict(test_x) == test_y).float().mean()) >= bayes - 0.02
    assert float((head.weight_ == 0).float().mean()) > 0.8


def test_solution_satisfies_the_optimality_conditions():
    train_x, train_y, *_ = planted(seed=1, n=1500)
    lam, ratio = 0.005, 0.9
    head = SparseLinearHead(lam=lam, l1_ratio=ratio, tol=1e-9, max_iter=5000).fit(train_x, train_y)
    z = head.transform(train_x)
    probs = torch.softmax(z @ head.weight_.T + head.bias_, 1)
    resid = (probs - torch.nn.functional.one_hot(train_y, 4).float()) / len(train_y)
    grad = resid.T @ z + lam * (1 - ratio) * head.weight_
    assert float(resid.sum(0).abs().max()) < 1e-4  # the bias is unpenalised
    nonzero = head.weight_ != 0
    assert float((grad[nonzero] + lam * ratio * torch.sign(head.weight_[nonzero])).abs().max()) < 1e-4
    assert float(grad[~nonzero].abs().max()) <= lam * ratio + 1e-4


def test_binary_task_learns_two_distinct_logits():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=gen)
    y = (x[:, 0] - x[:, 2] > 0).long()
    head = SparseLinearHead(lam=1e-3).fit(x, y)
    logits = head.decision_function(x)
    assert logits.shape == (600, 2) and head.weight_.shape == (2, 5)
    assert bool((logits[:, 0] != logits[:, 1]).all())
    assert float(head.weight_[0].abs().sum()) > 0.5 and float(head.weight_[1].abs().sum()) > 0.5
    assert float(head.weight_[1, 0]) > 0 > float(head.weight_[0, 0])
    assert float((head.predict(x) == y).float().mean()) > 0.95


def test_standardize_false_and_constant_scores():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=gen)
    x[:, 3] = 7.0  # a constant concept gets scale 1 and zero weight
    y = (x[:, 0] > 0).long()
    head = SparseLinearHead(standardize=False).fit(x, y)
    assert torch.equal(head.mean_, torch.zeros(4)) and torch.equal(head.scale_, torch.ones(4))
    assert torch.equal(head.transform(x), x)
    std = SparseLinearHead().fit(x, y)
    assert float(std.scale_[3]) == 1.0 and bool((std.weight_[:, 3] == 0).all())


def test_state_round_trip_and_copy_are_exact():
    train_x, train_y, test_x, *_ = planted(n=500)
    head = SparseLinearHead(lam=0.02).fit(train_x, train_y)
    tensors, config = head.state_dict()
    again = SparseLinearHead.from_state(tensors, config)
    for name in ("weight_", "bias_", "mean_", "scale_"):
        assert torch.equal(getattr(again, name), getattr(head, name))
    assert torch.equal(again.decision_function(test_x), head.decision_function(test_x))
    assert again.lam == 0.02 and again.n_iter_ == head.n_iter_
    clone = head.copy()
    clone.weight_[0, 0] = 123.0
    assert float(head.weight_[0, 0]) != 123.0


def test_errors_are_clear():
    with pytest.raises(NotFittedError, match="not fitted"):
        SparseLinearHead().predict(torch.zeros(2, 3))
    x = torch.randn(10, 3)
    with pytest.raises(DataError, match=r"classes \[2\] have no training examples"):
        SparseLinearHead().fit(x, torch.tensor([0, 1] * 5), n_classes=3)
    with pytest.raises(DataError, match="out of range"):
        SparseLinearHead().fit(x, torch.tensor([0, 1] * 4 + [0, 5]), n_classes=3)
    with pytest.raises(DataError, match="out of range"):
        SparseLinearHead().fit(x, torch.tensor([0, 1] * 4 + [0, -1]))
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        SparseLinearHead().fit(bad, torch.tensor([0, 1] * 5))
    with pytest.raises(ShapeError, match=r"\(10,\)"):
        SparseLinearHead().fit(x, torch.tensor([0, 1]))
    head = SparseLinearHead().fit(x, torch.tensor([0, 1] * 5))
    with pytest.raises(ShapeError, match="4 concepts but the head was fitted on 3"):
        head.predict(torch.zeros(2, 4))
    with pytest.raises(DataError, match="at least two classes"):
        SparseLinearHead().fit(x, torch.zeros(10, dtype=torch.long))


def test_select_lambda_walks_a_warm_started_path():
    train_x, train_y, test_x, test_y, *_ = planted(seed=2, n=1500)
    best, table = select_lambda(train_x, train_y, test_x, test_y, lams=[0.001, 0.1, 0.01, 0.3])
    assert [row["lam"] for row in table] == [0.3, 0.1, 0.01, 0.001]
    assert table[0]["sparsity"] >= table[-1]["sparsity"]
    best_acc = max(row["val_acc"] for row in table)
    assert float((best.predict(test_x) == test_y).float().mean()) == pytest.approx(best_acc)
    assert best.lam == next(row["lam"] for row in table if row["val_acc"] == best_acc)
    _, default_table = select_lambda(train_x, train_y, test_x, test_y)
    assert len(default_table) == 9 and default_table[0]["sparsity"] >= 0.85
