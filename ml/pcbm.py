"""Post-hoc concept bottleneck models: a concept bank, a sparse head, and the hybrid.

``PCBM``: embeddings -> concept scores (bank.project) -> sparse linear head -> logits.
``PCBMHybrid`` (PCBM-h) adds a residual linear layer on the raw embedding, trained with
the sparse head frozen. Both save to one safetensors file (``model.safetensors``) that
holds the bank, the head and the residual, with a JSON manifest; nothing is pickled.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ml.concepts import ConceptBank, check_embeddings, single_thread
from ml.errors import ConfigError, DataError, NotFittedError
from ml.head import SparseLinearHead, check_labels
from ml.store import load_tensors, save_tensors

MODEL_FILE = "model.safetensors"
_FORMAT = 1


def _model_path(directory: str | os.PathLike) -> Path:
    path = Path(directory)
    return path / MODEL_FILE if path.is_dir() or path.suffix != ".safetensors" else path


def _class_names(class_names: Sequence[str] | None, n_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(n_classes)]
    names = [str(c) for c in class_names]
    if len(names) != n_classes:
        raise ConfigError(f"got {len(names)} class names for {n_classes} classes")
    if len(set(names)) != len(names):
        raise ConfigError("class names must be unique")
    return names


class PCBM:
    """A concept bank plus a sparse linear head over its concept scores.

    Parameters
    ----------
    bank : the concept bank projecting embeddings to concept scores.
    head : the (unfitted or fitted) head; default ``SparseLinearHead()``.
    class_names : names of the classes, in label-index order (default "0", "1", ...).
    """

    def __init__(self, bank: ConceptBank, head: SparseLinearHead | None = None,
                 class_names: Sequence[str] | None = None):
        self.bank = bank
        self.head = head if head is not None else SparseLinearHead()
        self.class_names = list(class_names) if class_names is not None else None
        if hasattr(self.head, "weight_"):
            self._adopt_head(self.class_names)

    def _adopt_head(self, class_names: Sequence[str] | None) -> None:
        if self.head.weight_.shape[1] != len(self.bank):
            raise ConfigError(f"the head uses {self.head.weight_.shape[1]} concepts but the bank has {len(self.bank)}")
        self.classes_ = _class_names(class_names, self.head.n_classes_)

    def check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise NotFittedError("this PCBM is not fitted yet; call fit(embeddings, labels) first")

    @property
    def concept_names(self) -> list[str]:
        return list(self.bank.names)

    def fit(self, embeddings: torch.Tensor, labels: Any, class_names: Sequence[str] | None = None) -> PCBM:
        names = list(class_names) if class_names is not None else self.class_names
        scores = self.bank.project(embeddings)
        labels = check_labels(labels, scores.shape[0], len(names) if names is not None else None)
        n_classes = len(names) if names is not None else int(labels.max()) + 1 if len(labels) else 0
        counts = torch.bincount(labels, minlength=n_classes)
        empty = [(names[i] if names else str(i)) for i in (counts == 0).nonzero().flatten().tolist()]
        if empty:
            raise DataError(f"classes with no training examples: {', '.join(empty)}")
        self.head.fit(scores, labels, n_classes=n_classes)
        self._adopt_head(names)
        if names is not None:
            self.class_names = list(names)
        return self

    def concept_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.bank.project(embeddings)

    def decision_function(self, embeddings: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        return self.head.decision_function(self.bank.project(embeddings))

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.decision_function(embeddings).argmax(1)

    def predict_proba(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.decision_function(embeddings), 1)

    def explain(self, embeddings: torch.Tensor, class_index: int | Sequence[int] | None = None,
                top: int | None = None) -> list[dict[str, Any]]:
        """Per image: the class explained (predicted by default), its logit, the bias and the
        concept contributions ``W[k, i] * z_i`` (z = standardised score), largest |value| first.

        Concepts whose weight for the class is zero contribute nothing and are left out, so
        ``logit == bias + sum(contributions)`` (up to rounding). ``top`` keeps the largest few.
        """
        self.check_fitted()
        features = self.head.transform(self.bank.project(embeddings))
        logits = features @ self.head.weight_.T + self.head.bias_
        if class_index is None:
            classes = logits.argmax(1)
        else:
            classes = torch.as_tensor(class_index, dtype=torch.long).reshape(-1).expand(features.shape[0])
            if classes.numel() and (classes.min() < 0 or classes.max() >= len(self.classes_)):
                raise ConfigError(f"class index out of range for {len(self.classes_)} classes")
        out = []
        for row in range(features.shape[0]):
            k = int(classes[row])
            weights = self.head.weight_[k]
            used = weights.nonzero().flatten()
            values = weights[used] * features[row, used]
            order = values.abs().argsort(descending=True, stable=True)
            if top is not None:
                order = order[: int(top)]
            out.append({
                "class_index": k,
                "class_name": self.classes_[k],
                "logit": float(logits[row, k]),
                "bias": float(self.head.bias_[k]),
                "contributions": [
                    {"concept": self.bank.names[int(used[j])], "index": int(used[j]),
                     "weight": float(weights[used[j]]), "score": float(features[row, used[j]]),
                     "contribution": float(values[j])}
                    for j in order.tolist()
                ],
            })
        return out

    # -- persistence -------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        self.check_fitted()
        bank_tensors, bank_meta = self.bank.to_state("bank.")
        head_tensors, head_config = self.head.state_dict()
        tensors = {**bank_tensors, **{f"head.{k}": v for k, v in head_tensors.items()}}
        meta = {"kind": "pcbm", "format": _FORMAT, "bank": bank_meta, "head": head_config,
                "class_names": self.classes_}
        return tensors, meta

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/model.safetensors`` atomically; returns its path."""
        tensors, meta = self.to_state()
        path = _model_path(directory)
        save_tensors(path, tensors, meta)
        return path

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> PCBM:
        try:
            bank = ConceptBank.from_state(tensors, meta["bank"], prefix="bank.")
            head_tensors = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
            head = SparseLinearHead.from_state(head_tensors, meta["head"])
            return cls(bank, head, meta["class_names"])
        except KeyError as exc:
            raise DataError(f"model artifact is missing {exc.args[0]!r}") from None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PCBM:
        model = load_model(directory)
        if not isinstance(model, cls):
            raise DataError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def copy(self) -> PCBM:
        """A copy sharing the (immutable in practice) bank, with its own head."""
        return PCBM(self.bank, self.head.copy(), getattr(self, "classes_", self.class_names))


class PCBMHybrid:
    """PCBM-h: ``logits = pcbm logits + E @ R.T + r``; only the residual (R, r) is trained.

    Trained with Adam on cross-entropy plus ``l2 * mean(R**2)``, minibatches shuffled by a
    seeded generator, the residual starting at zero (so training starts from the PCBM).
    """

    def __init__(self, pcbm: PCBM, lr: float = 0.01, epochs: int = 20, batch_size: int = 64,
                 l2: float = 0.001, seed: int = 0):
        self.pcbm = pcbm
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.l2 = l2
        self.seed = seed

    # the concept part, for code that edits or explains either kind of model
    @property
    def bank(self) -> ConceptBank:
        return self.pcbm.bank

    @property
    def head(self) -> SparseLinearHead:
        return self.pcbm.head

    @property
    def classes_(self) -> list[str]:
        return self.pcbm.classes_

    @property
    def class_names(self) -> list[str] | None:
        return self.pcbm.class_names if self.pcbm.class_names is not None else getattr(self.pcbm, "classes_", None)

    def check_fitted(self) -> None:
        if not hasattr(self, "residual_weight_"):
            raise NotFittedError("this PCBM-h is not fitted yet; call fit(embeddings, labels) first")

    def fit(self, embeddings: torch.Tensor, labels: Any, class_names: Sequence[str] | None = None) -> PCBMHybrid:
        if int(self.epochs) < 0 or int(self.batch_size) < 1 or not self.lr > 0 or self.l2 < 0:
            raise ConfigError("PCBM-h needs epochs >= 0, batch_size >= 1, lr > 0 and l2 >= 0")
        if not hasattr(self.pcbm, "classes_"):
            self.pcbm.fit(embeddings, labels, class_names)
        embeddings = check_embeddings(embeddings, self.bank.dim)
        labels = check_labels(labels, embeddings.shape[0], len(self.pcbm.classes_))
        with torch.no_grad():
            base = self.pcbm.decision_function(embeddings)  # frozen concept part
        n_classes, dim = base.shape[1], embeddings.shape[1]
        weight = torch.zeros(n_classes, dim, requires_grad=True)
        bias = torch.zeros(n_classes, requires_grad=True)
        optim = torch.optim.Adam([weight, bias], lr=self.lr)
        gen = torch.Generator().manual_seed(int(self.seed))
        with single_thread(int(self.batch_size) * max(dim, n_classes) <= 1_000_000):  # minibatch ops are tiny
            for _ in range(int(self.epochs)):
                for idx in torch.randperm(embeddings.shape[0], generator=gen).split(int(self.batch_size)):
                    logits = base[idx] + embeddings[idx] @ weight.T + bias
                    loss = torch.nn.functional.cross_entropy(logits, labels[idx]) + self.l2 * weight.pow(2).mean()
                    optim.zero_grad()
                    loss.backward()
                    optim.step()
        self.residual_weight_ = weight.detach().clone()
        self.residual_bias_ = bias.detach().clone()
        return self

    def concept_scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.pcbm.concept_scores(embeddings)

    def residual_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        self.check_fitted()
        embeddings = check_embeddings(embeddings, self.bank.dim)
        dev = embeddings.device
        return embeddings @ self.residual_weight_.to(dev).T + self.residual_bias_.to(dev)

    def decision_function(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.pcbm.decision_function(embeddings) + self.residual_logits(embeddings)

    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.decision_function(embeddings).argmax(1)

    def predict_proba(self, embeddings: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.decision_function(embeddings), 1)

    def explain(self, embeddings: torch.Tensor, class_index: int | Sequence[int] | None = None,
                top: int | None = None) -> list[dict[str, Any]]:
        """The concept part's explanation, plus the residual's share of each explained logit."""
        if class_index is None:
            class_index = self.predict(embeddings).tolist()
        parts = self.pcbm.explain(embeddings, class_index, top)
        residual = self.residual_logits(embeddings)
        for row, part in enumerate(parts):
            part["residual"] = float(residual[row, part["class_index"]])
            part["logit"] += part["residual"]
        return parts

    def save(self, directory: str | os.PathLike) -> Path:
        self.check_fitted()
        tensors, meta = self.pcbm.to_state()
        tensors = {**tensors, "residual.weight": self.residual_weight_, "residual.bias": self.residual_bias_}
        meta = {**meta, "kind": "pcbm_hybrid", "hybrid": {k: getattr(self, k) for k in
                                                          ("lr", "epochs", "batch_size", "l2", "seed")}}
        path = _model_path(directory)
        save_tensors(path, tensors, meta)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> PCBMHybrid:
        model = load_model(directory)
        if not isinstance(model, cls):
            raise DataError(f"{directory} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def copy(self, pcbm: PCBM | None = None) -> PCBMHybrid:
        """A copy with its own head (or the given ``pcbm``) and the same residual."""
        self.check_fitted()
        model = PCBMHybrid(pcbm if pcbm is not None else self.pcbm.copy(),
                           self.lr, self.epochs, self.batch_size, self.l2, self.seed)
        model.residual_weight_ = self.residual_weight_.clone()
        model.residual_bias_ = self.residual_bias_.clone()
        return model


def load_model(directory: str | os.PathLike) -> PCBM | PCBMHybrid:
    """Load whichever model (PCBM or PCBM-h) was saved at ``directory``."""
    tensors, meta = load_tensors(_model_path(directory))
    kind = meta.get("kind")
    if kind not in ("pcbm", "pcbm_hybrid"):
        raise DataError(f"{directory} is not a saved PCBM model (kind={kind!r})")
    pcbm = PCBM.from_state(tensors, meta)
    if kind == "pcbm":
        return pcbm
    try:
        model = PCBMHybrid(pcbm, **meta["hybrid"])
        weight, bias = tensors["residual.weight"], tensors["residual.bias"]
    except (KeyError, TypeError) as exc:
        raise DataError(f"PCBM-h artifact is incomplete ({exc})") from None
    if weight.shape != (len(pcbm.classes_), pcbm.bank.dim) or bias.shape != (len(pcbm.classes_),):
        raise DataError("PCBM-h residual has the wrong shape for its bank and classes")
    model.residual_weight_, model.residual_bias_ = weight, bias
    return model
