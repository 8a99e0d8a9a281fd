"""End-to-end steps on a workspace: the functions behind the CLI and the demo build.

Each step loads what it needs by name from a :class:`~ml.workspace.Workspace`, does one
thing, saves its artifact under a new name, and returns a JSON-ready summary. Nothing
already saved is changed by a failing step: artifacts are written atomically and
registered only after they are complete.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ml.errors import ConfigError, DataError
from ml.workspace import Workspace, check_name

ProgressFactory = Callable[[str], tuple[Any, Callable[[int, int], None]]]


def _progress(factory: ProgressFactory | None, description: str):
    if factory is None:
        return contextlib.nullcontext(), None
    return factory(description)


def _backbone(workspace: Workspace, spec: str | None):
    from ml.backbone import load_backbone

    chosen = spec or workspace.backbone
    if not chosen:
        raise ConfigError("no backbone given: pass --backbone SPEC (e.g. 'demo' or 'open_clip:ViT-B-32@/path/weights.safetensors')")
    return chosen, load_backbone(chosen)


def embed(
    root: Path, dataset_path: Path, backbone_spec: str | None, name: str,
    batch_size: int = 64, num_workers: int | None = 0, progress_factory: ProgressFactory | None = None,
) -> dict:
    """Embed a dataset on disk and register it as ``name`` in the workspace (``num_workers=None``:
    as many decoding processes as :func:`ml.embed.auto_workers` picks)."""
    from ml.data import load_dataset
    from ml.embed import embed_dataset
    from ml.store import EmbeddingCache

    workspace = Workspace.open(root, create=True)
    spec, backbone = _backbone(workspace, backbone_spec)
    if workspace.backbone and workspace.backbone != spec and workspace.embeddings:
        raise ConfigError(
            f"workspace {workspace.root} already uses backbone {workspace.backbone!r}; use another workspace for {spec!r}"
        )
    dataset = load_dataset(dataset_path)
    cache = EmbeddingCache(workspace.cache_dir)
    before = sum(1 for _ in _cached_rows(cache, backbone.identity))
    progress, update = _progress(progress_factory, f"embedding {name}")
    with progress:
        embedded = embed_dataset(backbone, dataset, cache=cache, batch_size=batch_size, num_workers=num_workers, progress=update)
    after = sum(1 for _ in _cached_rows(cache, backbone.identity))
    path = workspace.new_path("embeddings", name, ".safetensors")
    embedded.save(path)
    workspace.backbone = spec
    workspace.datasets[name] = str(Path(dataset_path).resolve())
    workspace.register("embeddings", name, path)
    return {
        "name": name, "path": str(path), "backbone": spec, "backbone_identity": backbone.identity,
        "n_images": len(embedded.image_ids), "n_new": max(after - before, 0),
        "classes": embedded.classes, "splits": sorted(set(embedded.splits)),
    }


def _cached_rows(cache, identity: str):
    return cache._load_index(identity).keys()  # noqa: SLF001 - counting only


def _read_phrases(path: Path) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read phrases file {path}: {exc.strerror or exc}") from None
    phrases = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not phrases:
        raise DataError(f"{path} contains no concept phrases (one per line)")
    return phrases


def text_bank(
    root: Path, phrases_path: Path | Sequence[str], name: str, templates: Sequence[str] | None = None,
    backbone_spec: str | None = None, names: Sequence[str] | None = None,
) -> dict:
    """Build a text concept bank from phrases and register it."""
    from ml.concepts import text_concept_bank

    workspace = Workspace.open(root, create=True)
    spec, backbone = _backbone(workspace, backbone_spec)
    phrases = _read_phrases(phrases_path) if isinstance(phrases_path, (str, Path)) else list(phrases_path)
    bank = text_concept_bank(backbone, phrases, templates=list(templates) if templates else None, names=list(names) if names else None)
    path = workspace.new_path("banks", name)
    bank.save(path)
    workspace.backbone = workspace.backbone or spec
    workspace.register("banks", name, path)
    return {"name": name, "path": str(path), "n_concepts": len(bank.names), "concepts": bank.names}


def cav_bank(
    root: Path, source: Path, name: str, c_grid: Sequence[float] = (0.001, 0.01, 0.1, 1.0, 10.0),
    seed: int = 0, backbone_spec: str | None = None, progress_factory: ProgressFactory | None = None,
) -> dict:
    """Learn a CAV bank from an example layout or attribute table and register it."""
    from ml.concepts import learn_cav_bank
    from ml.data import load_attribute_table, load_concept_examples
    from ml.embed import embed_paths
    from ml.store import EmbeddingCache

    workspace = Workspace.open(root, create=True)
    spec, backbone = _backbone(workspace, backbone_spec)
    source = Path(source)
    examples = load_attribute_table(source) if source.is_file() else load_concept_examples(source)
    all_paths = sorted({p for pos, neg in examples.values() for p in (*pos, *neg)})
    cache = EmbeddingCache(workspace.cache_dir)
    progress, update = _progress(progress_factory, "embedding concept examples")
    with progress:
        vectors = embed_paths(backbone, all_paths, cache=cache, progress=update)
    row = {p: i for i, p in enumerate(all_paths)}
    positives = {c: vectors[[row[p] for p in pos]] for c, (pos, _) in examples.items()}
    negatives = {}
    for concept, (pos, neg) in examples.items():
        if not neg:  # no explicit negatives: the other concepts' positives stand in, as in Broden
            own = set(pos)
            neg = sorted({p for other, (other_pos, _) in examples.items() if other != concept for p in other_pos} - own)
        negatives[concept] = vectors[[row[p] for p in neg]]
    bank = learn_cav_bank(positives, negatives, c_grid=tuple(c_grid), seed=seed, backbone_identity=backbone.identity)
    path = workspace.new_path("banks", name)
    bank.save(path)
    workspace.backbone = workspace.backbone or spec
    workspace.register("banks", name, path)
    concepts = [{"name": n, **{k: v for k, v in info.items() if k in ("heldout_acc", "C", "near_chance")}} for n, info in zip(bank.names, bank.info, strict=False)]
    accs = [c["heldout_acc"] for c in concepts if c.get("heldout_acc") is not None]
    return {
        "name": name, "path": str(path), "n_concepts": len(bank.names), "concepts": concepts,
        "mean_heldout_acc": float(sum(accs) / len(accs)) if accs else float("nan"),
    }


def _load_embedded(workspace: Workspace, name: str | None):
    from ml.embed import EmbeddedDataset

    return EmbeddedDataset.load(workspace.path_for("embeddings", default_embeddings(workspace, name)))


def default_embeddings(workspace: Workspace, name: str | None) -> str:
    """``name``, or the workspace's only embedded dataset when none is named."""
    if name:
        return name
    if len(workspace.embeddings) == 1:
        return next(iter(workspace.embeddings))
    known = ", ".join(sorted(workspace.embeddings)) or "none yet (run `pcbm embed`)"
    raise ConfigError(f"name the embedded dataset with --embeddings (known: {known})")


def _load_model(workspace: Workspace, name: str):
    from ml.pcbm import load_model

    return load_model(workspace.path_for("models", name))


def split_reports(model, embedded) -> dict[str, dict]:
    """Accuracy report of ``model`` on every split of an embedded dataset."""
    from ml.evaluation import classification_report

    reports = {}
    group_names = sorted({g for g in embedded.groups if g is not None})
    for split in sorted(set(embedded.splits)):
        part = embedded.split(split)
        logits = model.decision_function(part.embeddings)
        groups = None
        if group_names and all(g is not None for g in part.groups):
            groups = torch.tensor([group_names.index(g) for g in part.groups])
        report = classification_report(logits, part.labels, groups=groups, class_names=embedded.classes, group_names=group_names or None)
        report["n"] = len(part.image_ids)
        reports[split] = report
    return reports


def train(
    root: Path, embeddings_name: str | None, bank_name: str, name: str, hybrid: bool = False,
    lam: float | None = None, l1_ratio: float = 0.99, standardize: bool = True,
    train_split: str = "train", val_split: str = "val", seed: int = 0,
) -> dict:
    """Train PCBM (or PCBM-h) on a split of an embedded dataset and register it."""
    from ml.concepts import ConceptBank
    from ml.head import SparseLinearHead, select_lambda
    from ml.pcbm import PCBM, PCBMHybrid

    workspace = Workspace.open(root)
    embeddings_name = default_embeddings(workspace, embeddings_name)
    embedded = _load_embedded(workspace, embeddings_name)
    bank = ConceptBank.load(workspace.path_for("banks", bank_name))
    if bank.backbone_identity and bank.backbone_identity != embedded.backbone_identity:
        raise ConfigError(f"concept bank {bank_name!r} was built with another backbone than embeddings {embeddings_name!r}")
    splits = set(embedded.splits)
    if train_split not in splits:
        raise DataError(f"embedded dataset {embeddings_name!r} has no split {train_split!r} (it has {sorted(splits)})")
    train_part = embedded.split(train_split)
    train_scores = bank.project(train_part.embeddings)
    if lam is None and val_split in splits:
        val_part = embedded.split(val_split)
        head, path_table = select_lambda(
            train_scores, train_part.labels, bank.project(val_part.embeddings), val_part.labels,
            l1_ratio=l1_ratio, standardize=standardize, n_classes=len(embedded.classes),
        )
        chosen_lam = float(head.lam)
    else:
        chosen_lam = 1e-3 if lam is None else lam
        head = SparseLinearHead(lam=chosen_lam, l1_ratio=l1_ratio, standardize=standardize)
        head.fit(train_scores, train_part.labels, n_classes=len(embedded.classes))
        path_table = None
    model = PCBM(bank, head, class_names=embedded.classes)
    if hybrid:
        model = PCBMHybrid(model, seed=seed).fit(train_part.embeddings, train_part.labels)
    path = workspace.new_path("models", name)
    model.save(path)
    workspace.register("models", name, path)
    if workspace.default_model is None:
        workspace.default_model = name
        workspace.save()
    return {
        "name": name, "path": str(path), "kind": "pcbm_h" if hybrid else "pcbm", "lam": chosen_lam,
        "bank": bank_name, "embeddings": embeddings_name, "lambda_path": path_table,
        "nonzero_weights": int((head.weight_ != 0).sum()), "splits": split_reports(model, embedded),
    }


def evaluate(root: Path, model_name: str, embeddings_name: str | None) -> dict:
    workspace = Workspace.open(root)
    embeddings_name = default_embeddings(workspace, embeddings_name)
    model = _load_model(workspace, model_name)
    embedded = _load_embedded(workspace, embeddings_name)
    return {"model": model_name, "embeddings": embeddings_name, "splits": split_reports(model, embedded)}


def explain_image(root: Path, model_name: str, image_path: Path, top: int = 10) -> dict:
    """Predict one image file and return its top concept contributions."""
    from ml.data import open_image
    from ml.embed import embed_images

    workspace = Workspace.open(root)
    model = _load_model(workspace, model_name)
    _, backbone = _backbone(workspace, None)
    embedding = embed_images(backbone, [open_image(image_path)])
    return explain_embedding(model, embedding, top=top)


def explain_embedding(model, embedding: torch.Tensor, top: int = 10) -> dict:
    probabilities = model.predict_proba(embedding)[0]
    explanation = model.explain(embedding, top=top)[0]
    predicted = int(probabilities.argmax())
    return {
        "predicted": model.class_names[predicted],
        "probability": float(probabilities[predicted]),
        "probabilities": {c: float(p) for c, p in zip(model.class_names, probabilities, strict=False)},
        "contributions": explanation["contributions"],
        "bias": explanation.get("bias"),
    }


def parse_edits(prune: Sequence[str], scale: Sequence[str], class_name: str | None, normalize: bool):
    from ml.editing import Edit

    edits = [Edit(op="prune_normalize" if normalize else "prune", concept=c, class_name=class_name) for c in prune]
    for item in scale:
        concept, sep, factor = item.rpartition("=")
        try:
            value = float(factor)
        except ValueError:
            value = None
        if not sep or not concept or value is None:
            raise ConfigError(f"--scale takes CONCEPT=FACTOR, got {item!r}")
        edits.append(Edit(op="scale", concept=concept, class_name=class_name, value=value))
    if not edits:
        raise ConfigError("nothing to edit: give --prune CONCEPT or --scale CONCEPT=FACTOR")
    return edits


def edit(
    root: Path, model_name: str, prune: Sequence[str], scale: Sequence[str], class_name: str | None,
    normalize: bool, embeddings_name: str | None, out: str | None, dry_run: bool,
) -> dict:
    """Preview edits on every split, then (unless ``dry_run``) save the result as a new model."""
    from ml.editing import apply_edits
    from ml.evaluation import EvalCache, preview_edits

    workspace = Workspace.open(root)
    saved_as = None if dry_run else (out or f"{model_name}-edited")
    if saved_as is not None:
        check_name(saved_as, "model name")
        if saved_as in workspace.models:
            raise ConfigError(f"model {saved_as!r} already exists; choose another --out name (models are never overwritten)")
    model = _load_model(workspace, model_name)
    edits = parse_edits(prune, scale, class_name, normalize)
    new_model, records = apply_edits(model, edits)
    embedded = _load_embedded(workspace, embeddings_name)
    preview = {}
    for split in sorted(set(embedded.splits)):
        cache = EvalCache.build(model, embedded.split(split))
        preview[split] = preview_edits(cache, model, new_model)
    if saved_as is not None:
        path = workspace.new_path("models", saved_as)
        new_model.save(path)
        workspace.register("models", saved_as, path)
    return {"model": model_name, "edits": [e.to_dict() for e in edits], "records": records, "preview": preview, "saved_as": saved_as}
