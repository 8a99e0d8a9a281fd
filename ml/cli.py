"""The library's command line: embed, build concept banks, train, evaluate, explain, edit.

Every command reads and writes a workspace directory (``--workspace``), prints a short
summary, and with ``--json`` prints one machine-readable JSON object instead. Bad input
ends with one line naming the problem and exit status 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ml.errors import ConfigError, PCBMError

cli = typer.Typer(help="Post-hoc concept bottleneck models: the library's commands.", no_args_is_help=True)
concepts_cli = typer.Typer(help="Build concept banks from text phrases or example images.", no_args_is_help=True)
cli.add_typer(concepts_cli, name="concepts")

console = Console(stderr=True)

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace directory.", envvar="PCBM_WORKSPACE")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a summary.")]


def friendly_errors(func: Callable) -> Callable:
    """Turn a library error into one line on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PCBMError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(code=2) from None
        except FileNotFoundError as exc:
            console.print(f"[bold red]error:[/] file not found: {exc.filename}")
            raise typer.Exit(code=2) from None

    return wrapper


def emit(as_json: bool, payload: dict, table: Table | None = None, lines: list[str] | None = None) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
        return
    out = Console()
    for line in lines or []:
        out.print(line, highlight=False)
    if table is not None:
        out.print(table)


def progress_bar(description: str, enabled: bool = True):
    """A rich progress bar whose ``update(done, total)`` callback fits the library's hooks."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=True,
    )
    task = progress.add_task(description, total=None, rate="")

    def update(done: int, total: int) -> None:
        elapsed = progress.tasks[task].elapsed or 0.0
        rate = f"{done / elapsed:.1f}/s" if elapsed > 0 else ""
        progress.update(task, completed=done, total=total, rate=rate)

    return progress, update


def _accuracy_table(title: str, rows: dict[str, dict]) -> Table:
    table = Table(title=title)
    table.add_column("split")
    table.add_column("n", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("worst group", justify="right")
    for split, report in rows.items():
        worst = report.get("worst_group_accuracy")
        table.add_row(split, str(report["n"]), f"{report['accuracy']:.3f}", "-" if worst is None else f"{worst:.3f}")
    return table


@cli.command()
@friendly_errors
def embed(
    dataset: Annotated[Path, typer.Argument(help="ImageFolder directory, or a CSV/Parquet manifest (path,label[,split][,group]).")],
    workspace: WorkspaceOpt,
    backbone: Annotated[str | None, typer.Option(help="Backbone spec, e.g. 'demo' or 'open_clip:ViT-B-32@/models/vitb32.safetensors'. Defaults to the workspace's.")] = None,
    name: Annotated[str, typer.Option(help="Name of the embedded dataset in the workspace.")] = "dataset",
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    workers: Annotated[int | None, typer.Option(min=0, help="Decoding worker processes (default: automatic: none for a few batches, 1 beside a CPU backbone, up to 8 feeding a GPU).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Embed a labelled image dataset with a backbone (cached: nothing is embedded twice)."""
    from ml import workflows

    result = workflows.embed(workspace, dataset, backbone, name, batch_size=batch_size, num_workers=workers, progress_factory=progress_bar)
    emit(as_json, result, lines=[f"embedded {result['n_images']} images ({result['n_new']} new) as '{name}' -> {result['path']}"])


@concepts_cli.command("text")
@friendly_errors
def concepts_text(
    phrases: Annotated[Path, typer.Argument(help="Text file, one concept phrase per line ('#' starts a comment).")],
    workspace: WorkspaceOpt,
    name: Annotated[str, typer.Option(help="Name of the concept bank.")] = "text",
    template: Annotated[list[str] | None, typer.Option(help="Prompt template with '{}' (repeatable); averaged.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone spec; defaults to the workspace's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a concept bank from phrases encoded by the backbone's text tower."""
    from ml import workflows

    result = workflows.text_bank(workspace, phrases, name, templates=template, backbone_spec=backbone)
    emit(as_json, result, lines=[f"concept bank '{name}': {result['n_concepts']} text concepts -> {result['path']}"])


@concepts_cli.command("examples")
@friendly_errors
def concepts_examples(
    source: Annotated[Path, typer.Argument(help="A folder <concept>/positives|negatives/, or an attribute table CSV (image,concept,present).")],
    workspace: WorkspaceOpt,
    name: Annotated[str, typer.Option(help="Name of the concept bank.")] = "cav",
    c_grid: Annotated[str, typer.Option(help="Comma-separated SVM C values; the best per concept is chosen on held-out examples.")] = "0.001,0.01,0.1,1,10",
    seed: Annotated[int, typer.Option(help="Seed of the train/held-out split.")] = 0,
    backbone: Annotated[str | None, typer.Option(help="Backbone spec; defaults to the workspace's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Learn concept activation vectors (linear SVMs, all concepts at once) from example images."""
    from ml import workflows

    try:
        grid = tuple(float(c) for c in c_grid.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"--c-grid must be comma-separated numbers, got {c_grid!r}") from None
    result = workflows.cav_bank(workspace, source, name, c_grid=grid, seed=seed, backbone_spec=backbone, progress_factory=progress_bar)
    flagged = [c["name"] for c in result["concepts"] if c.get("near_chance")]
    lines = [
        f"concept bank '{name}': {result['n_concepts']} CAVs, mean held-out accuracy {result['mean_heldout_acc']:.3f}",
    ]
    if flagged:
        lines.append(f"[yellow]near chance (consider removing):[/] {', '.join(flagged)}")
    emit(as_json, result, lines=lines)


@cli.command()
@friendly_errors
def train(
    workspace: WorkspaceOpt,
    embeddings: Annotated[str | None, typer.Option(help="Embedded dataset name (default: the workspace's only one).")] = None,
    bank: Annotated[str, typer.Option(help="Concept bank name.")] = "text",
    name: Annotated[str, typer.Option(help="Model name.")] = "pcbm",
    hybrid: Annotated[bool, typer.Option("--hybrid", help="Train PCBM-h (adds a residual on the raw embedding).")] = False,
    lam: Annotated[float | None, typer.Option(help="Elastic-net strength; default: chosen on the validation split.")] = None,
    l1_ratio: Annotated[float, typer.Option(min=0.0, max=1.0, help="L1 share of the elastic-net penalty.")] = 0.99,
    standardize: Annotated[bool, typer.Option(help="Standardise concept scores before the head.")] = True,
    train_split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    val_split: Annotated[str, typer.Option(help="Split to choose lam on.")] = "val",
    as_json: JsonOpt = False,
) -> None:
    """Train a sparse concept head (PCBM) or PCBM-h and report accuracy on every split."""
    from ml import workflows

    result = workflows.train(
        workspace, embeddings, bank, name, hybrid=hybrid, lam=lam, l1_ratio=l1_ratio,
        standardize=standardize, train_split=train_split, val_split=val_split,
    )
    emit(as_json, result, table=_accuracy_table(f"model '{name}' (lam={result['lam']:.3g})", result["splits"]))


@cli.command("eval")
@friendly_errors
def evaluate(
    workspace: WorkspaceOpt,
    model: Annotated[str, typer.Option(help="Model name.")] = "pcbm",
    embeddings: Annotated[str | None, typer.Option(help="Embedded dataset name (default: the workspace's only one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a model on every split: accuracy, per class, per group, worst group."""
    from ml import workflows

    result = workflows.evaluate(workspace, model, embeddings)
    emit(as_json, result, table=_accuracy_table(f"model '{model}'", result["splits"]))


@cli.command()
@friendly_errors
def explain(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    workspace: WorkspaceOpt,
    model: Annotated[str, typer.Option(help="Model name.")] = "pcbm",
    top: Annotated[int, typer.Option(min=1, help="How many concept contributions to show.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Predict one image and show the concepts that drove the decision."""
    from ml import workflows

    result = workflows.explain_image(workspace, model, image, top=top)
    table = Table(title=f"{image.name}: predicted '{result['predicted']}' (p={result['probability']:.2f})")
    table.add_column("concept")
    table.add_column("score", justify="right")
    table.add_column("weight", justify="right")
    table.add_column("contribution", justify="right")
    for row in result["contributions"]:
        label = row["concept"] if row["contribution"] >= 0 else f"NOT {row['concept']}"
        table.add_row(label, f"{row['score']:.3f}", f"{row['weight']:.3f}", f"{row['contribution']:+.3f}")
    emit(as_json, result, table=table)


@cli.command()
@friendly_errors
def edit(
    workspace: WorkspaceOpt,
    model: Annotated[str, typer.Option(help="Model to edit (never modified: the result is a new model).")] = "pcbm",
    prune: Annotated[list[str] | None, typer.Option(help="Concept to prune (repeatable).")] = None,
    scale: Annotated[list[str] | None, typer.Option(help="CONCEPT=FACTOR to scale a concept's weights (repeatable).")] = None,
    class_name: Annotated[str | None, typer.Option("--class", help="Only edit this class's weights (default: all classes).")] = None,
    normalize: Annotated[bool, typer.Option(help="After pruning, rescale the row so its L1 norm is unchanged.")] = False,
    embeddings: Annotated[str | None, typer.Option(help="Embedded dataset to preview the edit on (default: the workspace's only one).")] = None,
    out: Annotated[str | None, typer.Option(help="Name of the edited model (default: MODEL-edited).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only preview; save nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Edit a model globally, showing the effect on every split before anything is saved."""
    from ml import workflows

    result = workflows.edit(
        workspace, model, prune=prune or [], scale=scale or [], class_name=class_name,
        normalize=normalize, embeddings_name=embeddings, out=out, dry_run=dry_run,
    )
    table = Table(title="edit preview" + (" (dry run, nothing saved)" if dry_run else f" -> saved as '{result['saved_as']}'"))
    table.add_column("split")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    table.add_column("worst group", justify="right")
    for split, row in result["preview"].items():
        change = row["after"]["accuracy"] - row["before"]["accuracy"]
        worst = row["after"].get("worst_group_accuracy")
        table.add_row(
            split, f"{row['before']['accuracy']:.3f}", f"{row['after']['accuracy']:.3f}",
            f"{change:+.3f}", "-" if worst is None else f"{worst:.3f}",
        )
    emit(as_json, result, table=table)


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


@cli.command()
@friendly_errors
def metrics(
    workspace: WorkspaceOpt,
    model: Annotated[str, typer.Option(help="Model name.")] = "pcbm",
    split: Annotated[str, typer.Option(help="Split of the embedded dataset to measure on.")] = "test",
    annotations: Annotated[Path | None, typer.Option(help="Annotation folder: attributes.csv, masks/, world.json (default: the dataset's folder).")] = None,
    method: Annotated[str | None, typer.Option(help="Concept-map method, e.g. 'maskclip+softmax' (default: the architecture's).")] = None,
    embeddings: Annotated[str | None, typer.Option(help="Embedded dataset name (default: the workspace's only one).")] = None,
    top_l: Annotated[int, typer.Option("--l", min=1, help="How many top concepts CEM@l and CLM@l look at.")] = 5,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of a map's pixels that counts as where it points (CLM).")] = 0.2,
    iou_threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Threshold on the min-max normalised map for mask IoU.")] = 0.5,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N images of the split.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    as_json: JsonOpt = False,
) -> None:
    """Concept metrics on an annotated split: pointing game, existence (CEM@l), location (CLM@l), CGIM."""
    from ml import metrics_workflow

    progress, update = progress_bar("concept maps", enabled=not as_json)
    with progress:
        result = metrics_workflow.metrics(
            workspace, model, split=split, annotations_dir=annotations, method=method, embeddings_name=embeddings,
            l=top_l, alpha=alpha, iou_threshold=iou_threshold, batch_size=batch_size, limit=limit, progress=update)
    pointing = result["pointing_game"]
    lines = [
        f"model '{model}' on {result['n_images']} {split} images, maps by '{result['method']}' "
        f"({result['seconds']['total']:.1f}s)",
        f"pointing game: object {_fmt(pointing['object'])} (chance {_fmt(pointing['chance']['object'])}), "
        f"background {_fmt(pointing['background'])} (chance {_fmt(pointing['chance']['background'])})",
        f"CEM@{top_l} {_fmt(result['cem'])}   CLM@{top_l} {_fmt(result['clm'])} (alpha {alpha})   "
        + "   ".join(f"CGIM[{k}] {_fmt(v)}" for k, v in result["cgim"].items()),
    ]
    table = Table(title="per concept")
    for column in ("concept", "kind", "pointing", "mass / area", "existence", "location", "max |weight|"):
        table.add_column(column, justify="left" if column in ("concept", "kind") else "right")
    for name, row in result["per_concept"].items():
        ratio = f"{_fmt(row['mass_in_mask'], 2)} / {_fmt(row['area'], 2)}"
        table.add_row(name, row["kind"] or "-", _fmt(row["pointing_game"]), ratio, _fmt(row["existence"]),
                      _fmt(row["location"]), _fmt(row["max_abs_weight"]))
    emit(as_json, result, table=table, lines=lines)


def main() -> None:  # pragma: no cover - thin entry point when ml is used without the app
    cli()


@cli.command()
@friendly_errors
def suggest(
    workspace: WorkspaceOpt,
    method: Annotated[str, typer.Option(help="tfti (few-shot adaptation), greedy (prune search), spurious (group-explained concepts) or concept (add a typed concept).")],
    model: Annotated[str, typer.Option(help="Model to make proposals for (never modified).")] = "pcbm",
    target_split: Annotated[str, typer.Option(help="Labelled split to adapt to (tfti) or to maximise the metric on (greedy).")] = "test_shifted",
    source_split: Annotated[str, typer.Option(help="The split the model was trained on (tfti statistics; the new concept's column).")] = "train",
    shots: Annotated[int, typer.Option(min=1, help="tfti: labelled target images per class, drawn with --seed.")] = 4,
    k: Annotated[int, typer.Option(min=1, help="greedy: at most this many prunes.")] = 5,
    metric: Annotated[str, typer.Option(help="greedy: accuracy, worst_group or balanced_accuracy.")] = "accuracy",
    per_class: Annotated[bool, typer.Option("--per-class", help="greedy: also try pruning one class's weight.")] = False,
    split: Annotated[str | None, typer.Option(help="spurious: the split with group labels to rank on (default: every split pooled).")] = None,
    top: Annotated[int, typer.Option(min=1, help="spurious: propose pruning this many top-ranked concepts.")] = 5,
    phrase: Annotated[str | None, typer.Option(help="concept: the phrase of the concept to add.")] = None,
    seed: Annotated[int, typer.Option(help="tfti: seed of the shot sample.")] = 0,
    max_source_drop: Annotated[float, typer.Option(min=0.0, max=1.0, help="tfti: refuse edits that lower source-split accuracy by more than this (1 = no budget).")] = 0.015,
    embeddings: Annotated[str | None, typer.Option(help="Embedded dataset (default: the workspace's only one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Suggest edits from data, each previewed on every split; nothing is saved."""
    from ml import suggest_workflow

    result = suggest_workflow.suggest(
        workspace, model, method, embeddings_name=embeddings, target_split=target_split, source_split=source_split,
        shots=shots, k=k, metric=metric, seed=seed, per_class=per_class, split=split, top=top, phrase=phrase,
        max_source_drop=max_source_drop)
    found = list(result["combined"]["preview"]) or (list(result["proposals"][0]["preview"]) if result["proposals"] else [])
    splits = [s for s in ("train", "val", "test") if s in found] + [s for s in found if s not in ("train", "val", "test")]
    table = Table(title=f"{method} proposals for '{model}' (accuracy change per split)")
    table.add_column("#", justify="right")
    table.add_column("proposal")
    for name in splits:
        table.add_column(name, justify="right")
    rows = [(str(p["id"]), p["title"], p["preview"]) for p in result["proposals"]]
    if len(result["proposals"]) > 1 and result["combined"]["preview"]:
        rows.append(("all", "every proposal together" if method != "greedy" else "the whole greedy path",
                     result["combined"]["preview"]))
    for number, title, preview in rows:
        table.add_row(number, title, *(f"{preview[s]['accuracy']['before']:.3f}→{preview[s]['accuracy']['after']:.3f}"
                                       for s in splits))
    lines = [] if result["proposals"] else [f"{method}: no proposals for model '{model}'"]
    emit(as_json, result, table=table if result["proposals"] else None, lines=lines)
