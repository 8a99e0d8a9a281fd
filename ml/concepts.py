"""Concept banks: named directions in a backbone's embedding space.

A concept score is the signed distance of an embedding to the concept's hyperplane,
``(e . v + b) / ||v||`` (PCBM, section 1.2 of the science notes). Banks come from text
(CLIP text tower, :func:`text_concept_bank`) or from example images (linear SVMs,
:func:`learn_cav_bank`, every concept and every C value solved at once).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ml.errors import ConfigError, DataError, ShapeError
from ml.store import load_tensors, save_tensors

BANK_FILE = "bank.safetensors"
_KIND = "concept_bank"
_FORMAT = 1
_ARTICLES = {"a", "an", "the"}


def _jsonable(value: Any, where: str) -> Any:
    """Turn tensors/numpy scalars into plain Python so the value survives JSON unchanged."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, where) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist(), where)
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        return value.item()
    if value is None or isinstance(value, str | bool | int | float):
        return value
    raise DataError(f"{where} holds a value that cannot be saved: {value!r}")


def check_embeddings(embeddings: torch.Tensor, dim: int, what: str = "embeddings") -> torch.Tensor:
    """Return ``embeddings`` as float32 (N, dim), or raise a ShapeError/DataError saying why."""
    if not isinstance(embeddings, torch.Tensor):
        raise DataError(f"{what} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ShapeError(f"{what} must be 2-D (n_images, dim), got shape {tuple(embeddings.shape)}")
    if embeddings.shape[1] != dim:
        raise ShapeError(
            f"{what} have dimension {embeddings.shape[1]} but the concept bank has dimension {dim}"
            " (were they made with a different backbone?)"
        )
    embeddings = embeddings.to(torch.float32)
    if not torch.isfinite(embeddings).all():
        bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
        raise DataError(f"{what} contain NaN or Inf values ({bad} rows affected)")
    return embeddings


@dataclass
class ConceptBank:
    """Concept vectors (C, d) with intercepts, names and per-concept provenance."""

    names: list[str]  # unique concept names, one per row of ``vectors``
    vectors: torch.Tensor  # (C, d) float32 concept directions (text embedding or SVM weight)
    intercepts: torch.Tensor | None = None  # (C,) float32; zeros for text concepts
    sources: list[str] | None = None  # "text" | "cav" | "discovered" | "custom" per concept
    info: list[dict] | None = None  # per concept: phrase, heldout_acc, C, near_chance, ...
    backbone_identity: str = ""  # the backbone whose embedding space the vectors live in
    _norms: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        if not self.names:
            raise DataError("a concept bank needs at least one concept; the concept list is empty")
        seen: set[str] = set()
        dupes = sorted({n for n in self.names if n in seen or seen.add(n)})
        if dupes:
            raise ConfigError(f"concept names must be unique; duplicated: {', '.join(dupes)}")
        if any(not n.strip() for n in self.names):
            raise ConfigError("concept names must not be empty")
        vectors = torch.as_tensor(self.vectors).detach().to("cpu", torch.float32).contiguous()
        count = len(self.names)
        if vectors.ndim != 2 or vectors.shape[0] != count:
            raise ShapeError(f"vectors must have shape ({count}, dim) for {count} names, got {tuple(vectors.shape)}")
        if not torch.isfinite(vectors).all():
            raise DataError("concept vectors contain NaN or Inf values")
        if self.intercepts is None:
            intercepts = torch.zeros(count)
        else:
            intercepts = torch.as_tensor(self.intercepts).detach().to("cpu", torch.float32).reshape(-1).contiguous()
        if intercepts.shape != (count,):
            raise ShapeError(f"intercepts must have shape ({count},), got {tuple(intercepts.shape)}")
        if not torch.isfinite(intercepts).all():
            raise DataError("concept intercepts contain NaN or Inf values")
        self.sources = ["custom"] * count if self.sources is None else [str(s) for s in self.sources]
        self.info = [{} for _ in range(count)] if self.info is None else [dict(i) for i in self.info]
        if len(self.sources) != count or len(self.info) != count:
            raise ShapeError(f"sources and info need one entry per concept ({count})")
        norms = vectors.norm(dim=1)
        zero = [n for n, v in zip(self.names, norms.tolist(), strict=True) if not v > 0]
        if zero:
            raise DataError(f"concept vectors must be non-zero; zero vector for: {', '.join(zero[:5])}")
        self.vectors, self.intercepts, self._norms = vectors, intercepts, norms
        self.backbone_identity = str(self.backbone_identity or "")

    # -- basic views -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def norms(self) -> torch.Tensor:
        """L2 norm of each concept vector, shape (C,)."""
        return self._norms.clone()

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"unknown concept {name!r}; the bank has {len(self)} concepts") from None

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Concept scores ``(E @ V.T + b) / ||V||``, shape (N, C), on the embeddings' device."""
        embeddings = check_embeddings(embeddings, self.dim)
        device = embeddings.device
        vectors, intercepts, norms = (t.to(device) for t in (self.vectors, self.intercepts, self._norms))
        return (embeddings @ vectors.T + intercepts) / norms

    # -- composition -------------------------------------------------------------
    def subset(self, names: Sequence[str]) -> ConceptBank:
        """A new bank with the given concepts, in the given order."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ConfigError(f"unknown concepts: {', '.join(map(repr, missing[:10]))}")
        rows = [self.names.index(n) for n in names]
        return ConceptBank(
            names=list(names),
            vectors=self.vectors[rows].clone(),
            intercepts=self.intercepts[rows].clone(),
            sources=[self.sources[r] for r in rows],
            info=[json.loads(json.dumps(self.info[r])) for r in rows],
            backbone_identity=self.backbone_identity,
        )

    def concat(self, other: ConceptBank) -> ConceptBank:
        """This bank's concepts followed by ``other``'s (same backbone and dimension)."""
        if self.dim != other.dim:
            raise ShapeError(f"cannot join banks of dimension {self.dim} and {other.dim}")
        ids = {self.backbone_identity, other.backbone_identity} - {""}
        if len(ids) > 1:
            raise ConfigError("cannot join concept banks made with different backbones")
        return ConceptBank(
            names=self.names + other.names,
            vectors=torch.cat([self.vectors, other.vectors]),
            intercepts=torch.cat([self.intercepts, other.intercepts]),
            sources=self.sources + other.sources,
            info=[json.loads(json.dumps(i)) for i in self.info + other.info],
            backbone_identity=self.backbone_identity or other.backbone_identity,
        )

    # -- persistence -------------------------------------------------------------
    def to_state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and JSON metadata that :meth:`from_state` turns back into this bank."""
        meta = {
            "kind": _KIND,
            "format": _FORMAT,
            "names": self.names,
            "sources": self.sources,
            "info": _jsonable(self.info, "concept info"),
            "backbone_identity": self.backbone_identity,
        }
        return {f"{prefix}vectors": self.vectors, f"{prefix}intercepts": self.intercepts}, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "") -> ConceptBank:
        if meta.get("kind") != _KIND:
            raise DataError(f"not a concept bank (kind={meta.get('kind')!r})")
        try:
            return cls(
                names=meta["names"],
                vectors=tensors[f"{prefix}vectors"],
                intercepts=tensors[f"{prefix}intercepts"],
                sources=meta["sources"],
                info=meta["info"],
                backbone_identity=meta.get("backbone_identity", ""),
            )
        except KeyError as exc:
            raise DataError(f"concept bank artifact is missing {exc.args[0]!r}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/bank.safetensors`` atomically; returns its path."""
        path = Path(directory) / BANK_FILE
        tensors, meta = self.to_state()
        save_tensors(path, tensors, meta)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ConceptBank:
        """Load a bank from a directory written by :meth:`save` (or the file itself)."""
        path = Path(directory)
        if path.is_dir():
            path = path / BANK_FILE
        tensors, meta = load_tensors(path)
        return cls.from_state(tensors, meta)


def clean_phrase(phrase: str) -> str:
    """Tidy a concept phrase: underscores to spaces, single spaces, one leading article dropped.

    Only a whole leading word "a"/"an"/"the" goes, so "banana" stays "banana" (the
    published code's ``str.replace("a ", "")`` turned it into "banan").
    """
    words = str(phrase).replace("_", " ").split()
    if len(words) > 1 and words[0].lower() in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def text_concept_bank(
    backbone: Any,
    phrases: Sequence[str],
    templates: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    batch_size: int = 256,
) -> ConceptBank:
    """Concepts from text: mean over templates of unit text embeddings, renormalised.

    Parameters
    ----------
    backbone : object with ``encode_texts(list[str]) -> (N, d)`` and ``identity``.
    phrases : concept phrases; cleaned with :func:`clean_phrase`.
    templates : format strings with one ``{}``, e.g. ``"a photo of {}"``; default ``["{}"]``.
    names : concept names (default: the cleaned phrases).
    """
    cleaned = [clean_phrase(p) for p in phrases]
    if not cleaned:
        raise DataError("no concept phrases given; the concept list is empty")
    empty = [repr(p) for p, c in zip(phrases, cleaned, strict=True) if not c]
    if empty:
        raise DataError(f"empty concept phrases: {', '.join(empty[:5])}")
    templates = list(templates) if templates else ["{}"]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ConfigError(f"each template needs exactly one '{{}}' placeholder: {bad[0]!r}")
    names = list(names) if names is not None else cleaned
    if len(names) != len(cleaned):
        raise ShapeError(f"got {len(names)} names for {len(cleaned)} phrases")
    texts = [t.format(p) for p in cleaned for t in templates]
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            out = torch.as_tensor(backbone.encode_texts(texts[start : start + batch_size]))
            chunks.append(out.detach().to("cpu", torch.float32))
    encoded = torch.cat(chunks)
    if encoded.ndim != 2 or encoded.shape[0] != len(texts):
        raise ShapeError(f"encode_texts returned shape {tuple(encoded.shape)} for {len(texts)} texts")
    if not torch.isfinite(encoded).all():
        raise DataError("the text encoder returned NaN or Inf embeddings")
    unit = torch.nn.functional.normalize(encoded, dim=1).reshape(len(cleaned), len(templates), -1)
    vectors = torch.nn.functional.normalize(unit.mean(dim=1), dim=1)
    return ConceptBank(
        names=names,
        vectors=vectors,
        intercepts=torch.zeros(len(names)),
        sources=["text"] * len(names),
        info=[{"phrase": c, "templates": templates} for c in cleaned],
        backbone_identity=str(getattr(backbone, "identity", "") or ""),
    )


# -- concept activation vectors: batched linear SVMs ------------------------------------
#
# Each concept and each C of the grid is one SVM problem. sklearn's SVC(kernel="linear")
# solves the dual of 0.5||w||^2 + C * sum(hinge) with an unpenalised bias by SMO (libsvm;
# Fan, Chen and Lin, JMLR 2005). We run the same algorithm -- second-order working-set
# selection, the same stopping gap, the same rule for the bias -- on all concepts at
# once, so each step is a few (concepts x examples) tensor operations. Each concept walks
# the C grid upwards on its own: when it has solved one C it continues with the next from
# that solution (still feasible: the box only grows), and a solution with no multiplier
# at the bound is optimal for every larger C, so that concept is finished.

_SMO_TOL = 1e-3  # libsvm's default stopping tolerance on the KKT gap
_TAU = 1e-12  # libsvm's floor on a pair's curvature
_CHECK_EVERY = 8  # SMO steps between bookkeeping passes (finished stages, dropping problems)


@contextmanager
def single_thread(enabled: bool = True):
    """Run torch on one intra-op thread inside the block (restored afterwards).

    Iterative solvers issue thousands of small operations; with intra-op threads each
    one waits at a barrier, which on a busy machine costs far more than it saves.
    """
    if not enabled:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _smo_bias(coef, viol, y, mask, c):
    """libsvm's bias: mean of y*G over free vectors, else the middle of the feasible range."""
    inf = torch.tensor(float("inf"), dtype=viol.dtype)
    yg = -viol
    alpha = coef * y
    pos = y > 0
    at_upper = mask & (alpha >= c)
    at_lower = mask & (alpha <= 0)
    free = mask & ~at_upper & ~at_lower
    ub = torch.where((at_upper & ~pos) | (at_lower & pos), yg, inf).min(1).values
    lb = torch.where((at_upper & pos) | (at_lower & ~pos), yg, -inf).max(1).values
    n_free = free.sum(1)
    rho = torch.where(n_free > 0, (yg * free).sum(1) / n_free.clamp_min(1), (ub + lb) / 2)
    return -rho


class _SmoPath:
    """Batched SMO over concepts x C grid for ``min 0.5 a'Qa - sum(a)``, ``0 <= a <= C``,
    ``y'a = 0``, ``Q = yy' * K``.

    The state is ``coef = y * a`` (the box becomes ``lo <= coef <= hi``: one comparison per
    bound test) and ``viol = -y * (Q a - 1)``, which does not depend on C.
    """

    def __init__(self, kernel, y, mask, grid, max_iter):
        self.kernel, self.y, self.mask, self.max_iter = kernel, y, mask, max_iter
        count, n = y.shape
        dtype = kernel.dtype
        self.caps = torch.tensor(grid, dtype=dtype)
        # Start where small-C solutions usually are: every multiplier of the smaller class at
        # the bound and the larger class scaled to balance (feasible: y'a = 0).
        pos = (mask & (y > 0)).sum(1, keepdim=True).to(dtype)
        neg = (mask & (y < 0)).sum(1, keepdim=True).to(dtype)
        share = torch.minimum(pos, neg) / torch.where(y > 0, pos, neg)
        self.coef = share * self.caps[0] * y * mask
        self.viol = mask.to(dtype) * y - (kernel @ self.coef.unsqueeze(-1)).squeeze(-1)
        self.stage = torch.zeros(count, dtype=torch.long)  # index into the grid
        self.steps = torch.zeros(count, dtype=torch.long)  # steps spent on the current stage
        self.out_coef = torch.zeros(count, len(grid), n, dtype=dtype)
        self.out_bias = torch.zeros(count, len(grid), dtype=dtype)
        self.out_conv = torch.zeros(count, len(grid), dtype=torch.bool)

    def _finish(self, rows, converged):
        """Record the solved stage of ``rows``; advance them or mark them finished."""
        g = self.stage[rows]
        c = self.caps[g][:, None]
        coef, mask = self.coef[rows], self.mask[rows]
        bias = _smo_bias(coef, self.viol[rows], self.y[rows], mask, c)
        settled = ~(mask & (coef.abs() >= c)).any(1)  # no multiplier at the bound
        grid_idx = torch.arange(len(self.caps))[None]
        fill = (grid_idx == g[:, None]) | ((grid_idx > g[:, None]) & settled[:, None])
        self.out_coef[rows] = torch.where(fill[..., None], coef[:, None, :], self.out_coef[rows])
        self.out_bias[rows] = torch.where(fill, bias[:, None], self.out_bias[rows])
        self.out_conv[rows] = torch.where(fill, converged[:, None], self.out_conv[rows])
        finished = settled | (g == len(self.caps) - 1)
        moving = rows[~finished]
        self.stage[moving] += 1
        self.steps[moving] = 0
        return finished

    def solve(self):
        kernel, y, mask = self.kernel, self.y, self.mask
        n = y.shape[1]
        flat = kernel.reshape(-1, n)  # row (problem * n + i) is K_i of that problem
        diag = kernel.diagonal(dim1=1, dim2=2)
        zero = torch.tensor(0.0, dtype=kernel.dtype)
        inf = torch.tensor(float("inf"), dtype=kernel.dtype)
        sign = torch.tensor([1.0, -1.0], dtype=kernel.dtype)
        live = torch.arange(y.shape[0])
        offsets = torch.tensor([0, 1])
        step = 0
        cf = vl = hh = ll = zero  # the live block's state, (re)loaded at step 0 and every _CHECK_EVERY steps
        while True:
            if step % _CHECK_EVERY == 0:
                if step:
                    self.coef[live], self.viol[live] = cf, vl
                    self.steps[live] += _CHECK_EVERY
                    # libsvm's stopping rule, tested every few steps: steps in between only
                    # refine a solved problem further
                    gap = torch.where(cf < hh, vl, -inf).amax(1) - torch.where(cf > ll, vl, inf).amin(1)
                    solved = gap <= _SMO_TOL
                    ended = solved | (self.steps[live] >= self.max_iter)
                    if ended.any():
                        finished = self._finish(live[ended], solved[ended])
                        keep = torch.ones(live.numel(), dtype=torch.bool)
                        keep[ended.nonzero().flatten()[finished]] = False
                        live = live[keep]
                if live.numel() == 0:
                    break
                cap = self.caps[self.stage[live]][:, None]
                hh = torch.where(mask[live] & (y[live] > 0), cap, zero)  # padding: hi = lo = 0
                ll = torch.where(mask[live] & (y[live] < 0), -cap, zero)
                bounds = torch.stack([hh, ll], 2).reshape(live.numel(), -1)  # hi_i at 2i, lo_j at 2j + 1
                snap, row0, dd = 1e-12 * cap, live * n, diag[live]
                cf, vl = self.coef[live], self.viol[live]
            low = cf > ll  # coef may still decrease
            top, i = torch.where(cf < hh, vl, -inf).max(1)  # most violating among those that may increase
            k_i = flat.index_select(0, row0 + i)
            gain = top.unsqueeze(1) - vl
            curv = torch.add(dd, k_i, alpha=-2.0).add_(k_i.gather(1, i.unsqueeze(1))).clamp_min_(_TAU)
            rate = gain / curv  # the unclipped step for each partner
            j = torch.where(low & (gain > 0), gain * rate, -inf).argmax(1)
            # coef_i += t, coef_j -= t keeps y'a fixed; t is the pair's exact minimiser, clipped
            pair = torch.stack([i, j], 1)
            c_pair = cf.gather(1, pair)
            bound = bounds.gather(1, pair * 2 + offsets)
            room = ((bound - c_pair) * sign).amin(1)
            t = torch.minimum(rate.gather(1, j.unsqueeze(1)).squeeze(1), room).clamp_min_(0.0)
            moved = torch.addcmul(c_pair, t.unsqueeze(1), sign)
            # land exactly on the bound when clipped, so the bound tests stay exact
            cf.scatter_(1, pair, torch.where((moved - bound).abs() <= snap, bound, moved))
            vl.addcmul_(t.unsqueeze(1), flat.index_select(0, row0 + j) - k_i)
            step += 1
        return self.out_coef, self.out_bias, self.out_conv


def _fit_grid(train, grid: list[float]):
    """Weights (M, G, d), intercepts (M, G) and converged flags of every concept's SVMs."""
    x, y, mask = train
    width = y.shape[1]
    maskf = mask.float()
    mean = (x * maskf[..., None]).sum(1) / maskf.sum(1, keepdim=True)
    xc = (x - mean[:, None, :]) * maskf[..., None]  # centring: same SVM, better-conditioned Gram
    kernel = (xc @ xc.transpose(1, 2)).double()
    coef, bias, converged = _SmoPath(kernel, y.double(), mask, grid, max(10_000, 100 * width)).solve()
    weights = coef.float() @ xc  # w = sum_i alpha_i y_i (x_i - mean)
    intercepts = bias.float() - (weights * mean[:, None, :]).sum(-1)
    return weights, intercepts, converged


def _split_seed(seed: int, name: str) -> int:
    # Per-concept seeds from (seed, name): a concept's split does not depend on the others.
    return int(hashlib.sha256(f"{seed}|{name}".encode()).hexdigest()[:15], 16)


def _check_examples(name: str, what: str, x: Any, dim: int | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ShapeError(f"concept {name!r}: {what} must be a 2-D tensor (n, dim)")
    if dim is not None and x.shape[1] != dim:
        raise ShapeError(f"concept {name!r}: {what} have dimension {x.shape[1]}, expected {dim}")
    if x.shape[0] < 2:
        raise DataError(
            f"concept {name!r} has {x.shape[0]} {what}; at least 2 positives and 2 negatives are needed"
        )
    return x.detach().to("cpu", torch.float32)


def _split(x: torch.Tensor, heldout_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(x.shape[0], generator=gen)
    n_held = min(max(1, round(x.shape[0] * heldout_fraction)), x.shape[0] - 1)
    return x[order[n_held:]], x[order[:n_held]]


def _pad(sets: list[tuple[torch.Tensor, torch.Tensor]], dim: int):
    """Stack (positives, negatives) pairs into padded X (M, n, d), labels +-1 and a mask."""
    width = max(p.shape[0] + n.shape[0] for p, n in sets)
    x = torch.zeros(len(sets), width, dim)
    y = torch.zeros(len(sets), width)
    mask = torch.zeros(len(sets), width, dtype=torch.bool)
    for row, (p, n) in enumerate(sets):
        count = p.shape[0] + n.shape[0]
        x[row, :count] = torch.cat([p, n])
        y[row, : p.shape[0]], y[row, p.shape[0] : count] = 1.0, -1.0
        mask[row, :count] = True
    return x, y, mask


def learn_cav_bank(
    positives: dict[str, torch.Tensor],
    negatives: dict[str, torch.Tensor],
    c_grid: Sequence[float] = (0.001, 0.01, 0.1, 1, 10),
    heldout_fraction: float = 0.5,
    seed: int = 0,
    backbone_identity: str = "",
    near_chance: float = 0.6,
    chunk_elements: int = 8_000_000,
) -> ConceptBank:
    """Learn one linear-SVM concept vector per concept from example embeddings.

    Each concept's positives and negatives are split (seeded, stratified) into a
    training part and a held-out part; an SVM is trained for every C in ``c_grid`` and
    the C with the best held-out accuracy is kept (ties go to the smaller C). ``info``
    records ``heldout_acc``, ``C``, the accuracy of every C, and ``near_chance``
    (held-out accuracy below ``near_chance``).
    """
    names = list(positives)
    if not names:
        raise DataError("no concepts given; the concept list is empty")
    missing = sorted(set(names) ^ set(negatives))
    if missing:
        raise ConfigError(f"positives and negatives must name the same concepts; unmatched: {', '.join(missing)}")
    grid = sorted(float(v) for v in c_grid)
    if not grid or any(not (v > 0 and v < float("inf")) for v in grid):
        raise ConfigError(f"c_grid must hold positive finite values, got {list(c_grid)}")
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"heldout_fraction must be between 0 and 1, got {heldout_fraction}")
    with single_thread():
        return _learn(names, positives, negatives, grid, heldout_fraction, seed, near_chance, chunk_elements,
                      backbone_identity)


def _learn(names, positives, negatives, grid, heldout_fraction, seed, near_chance, chunk_elements, identity):
    dim = None
    splits = []
    for name in names:
        pos = _check_examples(name, "positives", positives[name], dim)
        dim = pos.shape[1]
        neg = _check_examples(name, "negatives", negatives[name], dim)
        gen = torch.Generator().manual_seed(_split_seed(seed, name))
        pos_train, pos_held = _split(pos, heldout_fraction, gen)
        neg_train, neg_held = _split(neg, heldout_fraction, gen)
        splits.append(((pos_train, neg_train), (pos_held, neg_held)))
    vectors, intercepts, info = [], [], []
    width = max(p.shape[0] + n.shape[0] for (p, n), _ in splits)
    step = max(1, chunk_elements // (width * max(width, dim)))  # bounds the Gram and padded inputs
    for start in range(0, len(names), step):
        part = splits[start : start + step]
        train = _pad([tr for tr, _ in part], dim)
        hx, hy, hmask = _pad([held for _, held in part], dim)
        extremes = torch.stack([t.amax((1, 2)) for t in (train[0], hx)] + [t.amin((1, 2)) for t in (train[0], hx)])
        bad = ~torch.isfinite(extremes).all(0)  # max/min propagate NaN and Inf
        if bad.any():  # checked in one batch, after padding (zeros), to keep the per-concept loop light
            raise DataError(f"concept {names[start + int(bad.nonzero()[0])]!r}: examples contain NaN or Inf values")
        weights, bias, converged = _fit_grid(train, grid)
        decision = hx @ weights.transpose(1, 2) + bias[:, None, :]  # (M, h, G)
        correct = ((decision > 0).float() * 2 - 1 == hy[..., None]) & hmask[..., None]
        acc = correct.sum(1).double() / hmask.sum(1, keepdim=True)  # (M, G), exact fractions
        best = acc.argmax(1)  # first maximum: the smallest C among ties
        for row, ((tr_pos, tr_neg), (held_pos, held_neg)) in enumerate(part):
            g = int(best[row])
            vectors.append(weights[row, g])
            intercepts.append(bias[row, g])
            held_acc = float(acc[row, g])
            info.append({
                "heldout_acc": held_acc,
                "C": grid[g],
                "near_chance": held_acc < near_chance,
                "heldout_acc_by_C": [[cv, float(acc[row, j])] for j, cv in enumerate(grid)],
                "converged": bool(converged[row, g]),
                "n_positives": tr_pos.shape[0] + held_pos.shape[0],
                "n_negatives": tr_neg.shape[0] + held_neg.shape[0],
                "n_train": tr_pos.shape[0] + tr_neg.shape[0],
                "n_heldout": held_pos.shape[0] + held_neg.shape[0],
                "seed": seed,
            })
    stacked = torch.stack(vectors)
    flat = [n for n, v in zip(names, stacked.norm(dim=1).tolist(), strict=True) if not v > 0]
    if flat:
        raise DataError(f"concept {flat[0]!r}: the SVM found no direction (positives and negatives coincide?)")
    return ConceptBank(names, stacked, torch.stack(intercepts), ["cav"] * len(names), info, identity)
