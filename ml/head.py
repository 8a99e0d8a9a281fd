"""The sparse interpretable head: softmax regression over concept scores with an elastic net.

Objective (bias unpenalised), over standardised scores ``Z``::

    mean cross-entropy(Z W' + b, y) + lam * (l1_ratio * |W|_1 + (1 - l1_ratio) / 2 * |W|_2^2)

solved full-batch by FISTA (accelerated proximal gradient) with backtracking on the step,
capped by a global Lipschitz bound, and adaptive restart. Every class gets its own row of
``W``, binary tasks included: the published code's single broadcast logit for binary
tasks cancels in the softmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ml.concepts import single_thread
from ml.errors import ConfigError, DataError, NotFittedError, ShapeError

_KIND = "sparse_linear_head"
_SCALE_FLOOR = 1e-6  # std below this (times 1 + |mean|) counts as a constant score
_WINDOW = 10  # iterations over which the objective's relative change is compared with tol
_SINGLE_THREAD_SIZE = 4_000_000  # score matrices up to this size are fitted on one thread


def check_labels(labels: Any, count: int, n_classes: int | None = None) -> torch.Tensor:
    """Return labels as a CPU long tensor of shape (count,), or raise a clear error."""
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != count:
        raise ShapeError(f"labels must have shape ({count},) to match the scores, got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise DataError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.to("cpu", torch.long)
    if count and labels.min() < 0:
        raise DataError(f"label {int(labels.min())} is out of range: labels are class indices >= 0")
    if count and n_classes is not None and labels.max() >= n_classes:
        raise DataError(f"label {int(labels.max())} is out of range for {n_classes} classes")
    return labels


def _soft_threshold(x: torch.Tensor, amount: float) -> torch.Tensor:
    return torch.sign(x) * (x.abs() - amount).clamp_min(0.0)


def _lipschitz_bound(features: torch.Tensor, l2: float, iters: int = 30) -> float:
    """Upper bound on the smooth part's gradient Lipschitz constant.

    The softmax cross-entropy's Hessian is below 1/2 [Z 1]'[Z 1] / n in every class block
    (Boehning's bound); its top eigenvalue comes from a few power iterations, padded by 5%.
    """
    n = features.shape[0]
    gram = torch.cat([features, torch.ones(n, 1, device=features.device, dtype=features.dtype)], 1)
    gram = gram.T @ gram / n
    vec = torch.ones(gram.shape[0], device=gram.device, dtype=gram.dtype)
    top = 1.0
    for _ in range(iters):
        nxt = gram @ vec
        top = float(nxt.norm())
        if top == 0:
            break
        vec = nxt / top
    return 1.05 * 0.5 * top + l2 + 1e-12


def _softmax_parts(logits_t: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Softmax over classes and the mean cross-entropy, for class-major logits (K, N).

    Class-major layout keeps the reductions over the short class axis vectorised along
    the long image axis (several times faster on CPU than softmax over a last dim of 10).
    """
    top = logits_t.amax(0, keepdim=True)
    probs = (logits_t - top).exp_()
    total = probs.sum(0, keepdim=True)
    ce = (top + total.log() - logits_t.gather(0, labels[None])).mean()
    return probs.div_(total), float(ce)


def _mean_ce(logits_t: torch.Tensor, labels: torch.Tensor) -> float:
    top = logits_t.amax(0, keepdim=True)
    lse = top + (logits_t - top).exp_().sum(0, keepdim=True).log_()
    return float((lse - logits_t.gather(0, labels[None])).mean())


def fista(features, labels, weight, bias, lam, l1_ratio, max_iter, tol):
    """Minimise the elastic-net softmax objective from (weight, bias); returns (W, b, n_iter, converged)."""
    n = features.shape[0]
    l1, l2 = lam * l1_ratio, lam * (1.0 - l1_ratio)
    labels = labels.to(features.device)
    onehot_t = torch.zeros(weight.shape[0], n, device=features.device, dtype=features.dtype)
    onehot_t.scatter_(0, labels[None], 1.0)
    l_max = _lipschitz_bound(features, l2)
    step_l = l_max / 8  # optimistic first step; backtracking raises it (never past l_max)

    x_w, x_b = weight, bias
    x_logits = x_w @ features.T + x_b[:, None]  # (K, N)
    y_w, y_b, y_logits = x_w, x_b, x_logits
    momentum = 1.0
    converged = False
    history: list[float] = []
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - `it` is the iteration count returned
        probs, ce = _softmax_parts(y_logits, labels)
        f_y = ce + 0.5 * l2 * float((y_w * y_w).sum())
        resid = probs.sub_(onehot_t).div_(n)
        grad_w = resid @ features + l2 * y_w
        grad_b = resid.sum(1)
        while True:
            new_w = _soft_threshold(y_w - grad_w / step_l, l1 / step_l)
            new_b = y_b - grad_b / step_l
            new_logits = new_w @ features.T + new_b[:, None]
            d_w, d_b = new_w - y_w, new_b - y_b
            model = f_y + float((grad_w * d_w).sum() + (grad_b * d_b).sum())
            model += 0.5 * step_l * float((d_w * d_w).sum() + (d_b * d_b).sum())
            f_new = _mean_ce(new_logits, labels) + 0.5 * l2 * float((new_w * new_w).sum())
            if f_new <= model + 1e-6 * abs(f_y) or step_l >= l_max:
                break
            step_l = min(2.0 * step_l, l_max)
        change = max(float((new_w - x_w).abs().max()), float((new_b - x_b).abs().max()))
        scale = max(1.0, float(new_w.abs().max()), float(new_b.abs().max()))
        history.append(f_new + l1 * float(new_w.abs().sum()))
        # restart the momentum when it points uphill (O'Donoghue & Candes, 2015)
        uphill = float(((y_w - new_w) * (new_w - x_w)).sum() + ((y_b - new_b) * (new_b - x_b)).sum()) > 0
        if uphill:
            momentum, beta = 1.0, 0.0
        else:
            nxt = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * momentum * momentum))
            beta, momentum = (momentum - 1.0) / nxt, nxt
        y_w = new_w + beta * (new_w - x_w)
        y_b = new_b + beta * (new_b - x_b)
        y_logits = new_logits + beta * (new_logits - x_logits)  # logits are linear in (W, b)
        x_w, x_b, x_logits = new_w, new_b, new_logits
        # stop when the parameters stand still, or when the objective has not moved by more
        # than tol (relative) over the last _WINDOW steps: later steps only shave weights
        # that are already negligible
        stalled = len(history) > _WINDOW and abs(history[-1 - _WINDOW] - history[-1]) <= tol * abs(history[-1])
        if change <= tol * scale or stalled:
            converged = True
            break
        step_l = max(step_l * 0.9, l_max / 1024)  # let the step grow back where curvature is low
    return x_w, x_b, it, converged


class SparseLinearHead:
    """Elastic-net multinomial logistic regression over concept scores (sklearn-style).

    Parameters
    ----------
    lam : penalty strength (mean cross-entropy scale). l1_ratio : share of the L1 part.
    standardize : z-score each concept on the training data before fitting.
    max_iter, tol : FISTA budget; stop when the largest parameter change, or the objective's
        change over the last 10 iterations, is below tol (relative).
    device : where fitting runs ("cpu", "cuda"); learned state is kept on the CPU.
    warm_start : start ``fit`` from the current weights when shapes match.
    """

    def __init__(self, lam: float = 1e-3, l1_ratio: float = 0.99, standardize: bool = True,
                 max_iter: int = 3000, tol: float = 1e-6, device: str = "cpu", warm_start: bool = False):
        self.lam = lam
        self.l1_ratio = l1_ratio
        self.standardize = standardize
        self.max_iter = max_iter
        self.tol = tol
        self.device = device
        self.warm_start = warm_start

    # -- helpers -----------------------------------------------------------------
    def _check_params(self) -> None:
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ConfigError(f"lam must be a non-negative number, got {self.lam}")
        if not 0 <= self.l1_ratio <= 1:
            raise ConfigError(f"l1_ratio must be in [0, 1], got {self.l1_ratio}")
        if int(self.max_iter) < 1 or not self.tol > 0:
            raise ConfigError("max_iter must be >= 1 and tol > 0")

    def check_fitted(self) -> None:
        if not hasattr(self, "weight_"):
            raise NotFittedError("this head is not fitted yet; call fit(scores, labels) first")

    def check_scores(self, scores: Any, dim: int | None = None) -> torch.Tensor:
        if not isinstance(scores, torch.Tensor):
            raise DataError(f"concept scores must be a torch.Tensor, got {type(scores).__name__}")
        if scores.ndim != 2:
            raise ShapeError(f"concept scores must be 2-D (n_images, n_concepts), got shape {tuple(scores.shape)}")
        if dim is not None and scores.shape[1] != dim:
            raise ShapeError(f"concept scores have {scores.shape[1]} concepts but the head was fitted on {dim}")
        scores = scores.to(torch.float32)
        if not torch.isfinite(scores).all():
            raise DataError("concept scores contain NaN or Inf values")
        return scores

    @property
    def n_concepts_(self) -> int:
        self.check_fitted()
        return int(self.weight_.shape[1])

    # -- fitting -----------------------------------------------------------------
    def fit(self, scores: torch.Tensor, labels: Any, n_classes: int | None = None) -> SparseLinearHead:
        self._check_params()
        scores = self.check_scores(scores)
        if scores.shape[0] == 0:
            raise DataError("cannot fit a head on zero images")
        labels = check_labels(labels, scores.shape[0], n_classes)
        n_classes = int(n_classes) if n_classes is not None else int(labels.max()) + 1
        if n_classes < 2:
            raise DataError(f"a classifier needs at least two classes, got {n_classes}")
        counts = torch.bincount(labels, minlength=n_classes)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise DataError(f"classes {empty} have no training examples; every class needs at least one")
        device = torch.device(self.device)
        scores = scores.to(device)
        if self.standardize:
            mean = scores.mean(0)
            std = scores.std(0, unbiased=False)
            scale = torch.where(std > _SCALE_FLOOR * (1 + mean.abs()), std, torch.ones_like(std))
        else:
            mean = torch.zeros(scores.shape[1], device=device)
            scale = torch.ones(scores.shape[1], device=device)
        features = (scores - mean) / scale
        warm = self.warm_start and hasattr(self, "weight_") and self.weight_.shape == (n_classes, scores.shape[1])
        if warm:
            weight, bias = self.weight_.to(device), self.bias_.to(device)
        else:  # the best constant model: zero weights, bias = log class frequencies
            weight = torch.zeros(n_classes, scores.shape[1], device=device)
            bias = torch.log(counts.to(device, torch.float32) / labels.shape[0])
        with single_thread(device.type == "cpu" and features.numel() <= _SINGLE_THREAD_SIZE):
            weight, bias, n_iter, converged = fista(
                features, labels, weight, bias, float(self.lam), float(self.l1_ratio), int(self.max_iter),
                float(self.tol),
            )
        self.weight_, self.bias_ = weight.cpu(), bias.cpu()
        self.mean_, self.scale_ = mean.cpu(), scale.cpu()
        self.n_classes_, self.n_iter_, self.converged_ = n_classes, n_iter, converged
        return self

    # -- inference ---------------------------------------------------------------
    def transform(self, scores: torch.Tensor) -> torch.Tensor:
        """Standardised scores ``(scores - mean_) / scale_`` (identity when standardize=False)."""
        self.check_fitted()
        scores = self.check_scores(scores, self.n_concepts_)
        return (scores - self.mean_.to(scores.device)) / self.scale_.to(scores.device)

    def decision_function(self, scores: torch.Tensor) -> torch.Tensor:
        features = self.transform(scores)
        return features @ self.weight_.to(features.device).T + self.bias_.to(features.device)

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        return self.decision_function(scores).argmax(1)

    def predict_proba(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.decision_function(scores), 1)

    # -- state -------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("lam", "l1_ratio", "standardize", "max_iter", "tol", "device",
                                              "warm_start")}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and a JSON config from which :meth:`from_state` rebuilds this head."""
        self.check_fitted()
        tensors = {"weight": self.weight_, "bias": self.bias_, "mean": self.mean_, "scale": self.scale_}
        config = {"kind": _KIND, **self.get_params(), "n_classes": self.n_classes_, "n_iter": self.n_iter_,
                  "converged": self.converged_}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, config

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> SparseLinearHead:
        if config.get("kind") != _KIND:
            raise DataError(f"not a sparse linear head (kind={config.get('kind')!r})")
        try:
            head = cls(**{k: config[k] for k in ("lam", "l1_ratio", "standardize", "max_iter", "tol")},
                       device=config.get("device", "cpu"), warm_start=config.get("warm_start", False))
            weight, bias = tensors["weight"].float(), tensors["bias"].float()
            mean, scale = tensors["mean"].float(), tensors["scale"].float()
        except KeyError as exc:
            raise DataError(f"head state is missing {exc.args[0]!r}") from None
        k, c = weight.shape if weight.ndim == 2 else (-1, -1)
        if k < 2 or bias.shape != (k,) or mean.shape != (c,) or scale.shape != (c,):
            raise DataError("head state has inconsistent shapes")
        head.weight_, head.bias_, head.mean_, head.scale_ = weight, bias, mean, scale
        head.n_classes_ = int(k)
        head.n_iter_ = int(config.get("n_iter", 0))
        head.converged_ = bool(config.get("converged", True))
        return head

    def copy(self) -> SparseLinearHead:
        """An independent copy (tensors cloned)."""
        if not hasattr(self, "weight_"):
            return SparseLinearHead(**self.get_params())
        tensors, config = self.state_dict()
        return SparseLinearHead.from_state({k: v.clone() for k, v in tensors.items()}, config)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"SparseLinearHead({params})"


def lambda_max(features: torch.Tensor, labels: torch.Tensor, n_classes: int, l1_ratio: float) -> float:
    """Smallest lam for which the head's weights are all zero (bias at the log class frequencies)."""
    onehot = torch.nn.functional.one_hot(labels.to(features.device), n_classes).to(features.dtype)
    prior = onehot.mean(0, keepdim=True)
    grad = (prior - onehot).T @ features / features.shape[0]
    return float(grad.abs().max()) / max(l1_ratio, 1e-12)


def select_lambda(train_scores: torch.Tensor, train_labels: Any, val_scores: torch.Tensor, val_labels: Any,
                  lams: Sequence[float] | None = None, n_classes: int | None = None,
                  **head_kwargs: Any) -> tuple[SparseLinearHead, list[dict[str, float]]]:
    """Fit heads along a decreasing lam path (warm-started) and keep the best on validation.

    Returns the best head (ties go to the larger, sparser lam) and a table with one row per
    lam: ``lam``, ``val_acc``, ``sparsity``, ``nonzeros_per_class``, ``n_iter``.
    """
    head = SparseLinearHead(**head_kwargs)
    head.warm_start = True
    scores = head.check_scores(train_scores)
    labels = check_labels(train_labels, scores.shape[0], n_classes)
    n_classes = n_classes or int(labels.max()) + 1
    if lams is None:
        std = scores.std(0, unbiased=False).clamp_min(_SCALE_FLOOR) if head.standardize else 1.0
        features = (scores - scores.mean(0)) / std if head.standardize else scores
        top = lambda_max(features, labels, n_classes, head.l1_ratio)
        lams = [top * f for f in (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)]
    lams = sorted((float(v) for v in lams), reverse=True)
    if not lams:
        raise ConfigError("select_lambda needs at least one lam")
    val_labels = check_labels(val_labels, val_scores.shape[0], n_classes)
    table, best, best_acc = [], None, -1.0
    for lam in lams:
        head.lam = lam
        head.fit(scores, labels, n_classes=n_classes)
        acc = float((head.predict(val_scores) == val_labels).float().mean())
        zeros = float((head.weight_ == 0).float().mean())
        table.append({"lam": lam, "val_acc": acc, "sparsity": zeros,
                      "nonzeros_per_class": float((head.weight_ != 0).sum(1).float().mean()),
                      "n_iter": head.n_iter_})
        if acc > best_acc:
            best, best_acc = head.copy(), acc
    best.warm_start = bool(head_kwargs.get("warm_start", False))
    return best, table
