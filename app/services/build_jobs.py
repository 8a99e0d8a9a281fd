"""Building models from the web app: embed a dataset, build a concept bank, train a head.

Each is a job (``embed``, ``bank``, ``train``) on the served workspace, run by the app's
:class:`~app.services.runner.JobRunner` with the same ``ml.workflows`` functions the CLI
uses. A request is checked completely before its job is queued (names free, paths inside
the data root, the embeddings and bank it names known), so a job fails only for reasons
found in the data itself, with the library's message.

* Jobs report percent and stage; ``POST /jobs/{id}/cancel`` stops them at the next report.
* An embedding job interrupted by a restart resumes: the embedding cache keeps every
  finished shard, and cached images are not decoded again.
* A finished ``train`` job registers the model in the database (version 1) and loads it into
  the model service, so it is on the home page and in ``GET /models`` at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.db import session_scope
from app.errors import Conflict, InvalidInput, NotFound
from app.models import Job, Model, User
from app.services import jobs
from app.services.runner import JobContext, JobHandler
from app.templating import url
from ml.errors import PCBMError

log = logging.getLogger(__name__)

EMBED, BANK, TRAIN = "embed", "bank", "train"
KINDS = (EMBED, BANK, TRAIN)
# Jobs of this module change the workspace manifest one at a time, even if a deployment runs
# several job runners in one process. Requests only read it, without the lock: the manifest is
# replaced atomically, so a read never waits for a long embedding job.
_WORKSPACE_LOCK = threading.Lock()


# -- checking requests -------------------------------------------------------------------------
def served_workspace(ctx: Any):
    """The served workspace's manifest; an empty one (not written) if it has none yet."""
    from ml.workspace import MANIFEST, Workspace

    root = Path(ctx.settings.workspace)
    return Workspace.open(root) if (root / MANIFEST).is_file() else Workspace(root=root.resolve())


def _name(name: str, what: str) -> str:
    from ml.workspace import check_name

    try:
        return check_name(name, what)
    except PCBMError as exc:
        raise InvalidInput(str(exc)) from None


def data_path(ctx: Any, relative: str, what: str) -> Path:
    """``relative`` joined under the data root (``PCBM_DATA_ROOT``), or 422 naming the problem."""
    from ml.store import safe_join

    root = ctx.settings.data_root_path
    try:
        path = safe_join(root, relative)
        found = path.exists()
    except PCBMError as exc:
        raise InvalidInput(f"{what}: {exc}; give a path relative to the data root {root}") from None
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise InvalidInput(f"{what} {relative[:80]!r} cannot be used under the data root {root}: "
                           f"{exc.strerror or exc}") from None
    if not found:
        raise InvalidInput(f"{what} {relative!r} does not exist under the data root {root}")
    return path


def _taken(workspace: Any, kind: str, name: str, what: str) -> None:
    if name in getattr(workspace, kind):
        raise Conflict(f"a {what} named {name!r} already exists in the workspace; choose another name")


def _pending(session: Session, kind: str, name: str) -> None:
    """A queued or running job of ``kind`` already makes ``name``."""
    for job in jobs.active_jobs(session, [kind]):
        if (job.params or {}).get("name") == name:
            raise Conflict(f"job {job.id} is already making {name!r}; wait for it or cancel it")


def _known(workspace: Any, kind: str, name: str, what: str) -> None:
    if name not in getattr(workspace, kind):
        known = ", ".join(sorted(getattr(workspace, kind))) or "none yet"
        raise NotFound(f"no {what} named {name!r} (known: {known})")


def _backbone_spec(workspace: Any, spec: str | None) -> str:
    from ml.backbone import parse_backbone_spec

    chosen = spec or workspace.backbone
    if not chosen:
        raise InvalidInput("this workspace has no backbone yet: name one (e.g. 'demo' or "
                           "'open_clip:ViT-B-32@/path/weights.safetensors')")
    if workspace.backbone and workspace.embeddings and chosen != workspace.backbone:
        raise InvalidInput(f"this workspace uses backbone {workspace.backbone!r}; serve another workspace "
                           f"for {chosen!r}")
    try:
        parse_backbone_spec(chosen)
    except PCBMError as exc:
        raise InvalidInput(str(exc)) from None
    return chosen


def request_embed(session: Session, ctx: Any, user: User, *, name: str, path: str,
                  backbone: str | None = None, batch_size: int = 64) -> Job:
    """Queue embedding the dataset at ``path`` (under the data root) as ``name``."""
    name = _name(name, "dataset name")
    workspace = served_workspace(ctx)
    _taken(workspace, "embeddings", name, "dataset")
    _pending(session, EMBED, name)
    source = data_path(ctx, path, "dataset path")
    spec = _backbone_spec(workspace, backbone)
    return _queue(session, ctx, user, EMBED, {"name": name, "path": path, "source": str(source), "backbone": spec,
                                              "batch_size": batch_size, "title": f"Embedding dataset {name}"})


def request_bank(session: Session, ctx: Any, user: User, *, name: str, kind: str,
                 phrases: Sequence[str] | None = None, examples: str | None = None) -> Job:
    """Queue a text bank from ``phrases`` or a CAV bank from the example folders at ``examples``."""
    name = _name(name, "concept bank name")
    workspace = served_workspace(ctx)
    _taken(workspace, "banks", name, "concept bank")
    _pending(session, BANK, name)
    spec = _backbone_spec(workspace, None)
    params: dict[str, Any] = {"name": name, "kind": kind, "backbone": spec}
    if kind == "text":
        cleaned = [p.strip() for p in phrases or () if p.strip()]
        if not cleaned:
            raise InvalidInput("a text concept bank needs at least one phrase")
        if len(set(cleaned)) != len(cleaned):
            raise InvalidInput("a phrase is listed twice")
        params["phrases"] = cleaned
    elif kind == "cav":
        if not examples:
            raise InvalidInput("a CAV bank needs `examples`: a concept-example folder or attribute table")
        params["examples"] = examples
        params["source"] = str(data_path(ctx, examples, "concept examples"))
    else:
        raise InvalidInput(f"unknown concept bank kind {kind!r} (text or cav)")
    params["title"] = f"Building concept bank {name}"
    return _queue(session, ctx, user, BANK, params)


def request_train(session: Session, ctx: Any, user: User, *, name: str, embeddings: str, bank: str,
                  hybrid: bool = False, lam: float | None = None) -> Job:
    """Queue training PCBM (or PCBM-h) ``name`` on ``embeddings``' train split over ``bank``."""
    name = _name(name, "model name")
    workspace = served_workspace(ctx)
    _taken(workspace, "models", name, "model")
    _pending(session, TRAIN, name)
    _known(workspace, "embeddings", embeddings, "embedded dataset")
    _known(workspace, "banks", bank, "concept bank")
    return _queue(session, ctx, user, TRAIN, {"name": name, "embeddings": embeddings, "bank": bank,
                                              "hybrid": hybrid, "lam": lam, "title": f"Training model {name}"})


def _queue(session: Session, ctx: Any, user: User, kind: str, params: dict[str, Any]) -> Job:
    job = jobs.create_job(session, kind, params, user=user)
    runner = getattr(ctx, "runner", None)
    if runner is not None:
        runner.wake()
    return job


# -- listing --------------------------------------------------------------------------------------
def list_datasets(ctx: Any) -> list[dict[str, Any]]:
    """The workspace's embedded datasets: name, source folder and what the embedding file says."""
    from collections import Counter

    from ml.store import load_meta

    workspace = served_workspace(ctx)
    rows = []
    for name in sorted(workspace.embeddings):
        try:
            meta = load_meta(workspace.path_for("embeddings", name))
        except (PCBMError, OSError) as exc:
            rows.append({"name": name, "source": workspace.datasets.get(name), "error": str(exc)})
            continue
        rows.append({"name": name, "source": workspace.datasets.get(name), "backbone": workspace.backbone,
                     "classes": list(meta.get("classes") or []), "n_images": len(meta.get("image_ids") or []),
                     "splits": dict(sorted(Counter(meta.get("splits") or []).items()))})
    return rows


def list_banks(ctx: Any) -> list[dict[str, Any]]:
    from ml.concepts import ConceptBank

    workspace = served_workspace(ctx)
    rows = []
    for name in sorted(workspace.banks):
        try:
            bank = ConceptBank.load(workspace.path_for("banks", name))
        except (PCBMError, OSError) as exc:
            rows.append({"name": name, "concepts": [], "error": str(exc)})
            continue
        rows.append({"name": name, "concepts": list(bank.names), "sources": sorted(set(bank.sources))})
    return rows


# -- running --------------------------------------------------------------------------------------
def _progress_factory(job: JobContext, start: float = 0.0, span: float = 1.0):
    """An ``ml.workflows`` progress factory that reports to the job (and so can cancel it)."""

    def factory(description: str):
        job.progress(start, description)

        def update(done: int, total: int) -> None:
            job.progress(start + span * (done / total if total else 1.0))

        return contextlib.nullcontext(), update

    return factory


def _embed(ctx: Any) -> JobHandler:
    def run(job: JobContext) -> dict[str, Any]:
        from ml import workflows

        p = job.params
        job.progress(0.0, "loading the backbone" if job.attempt == 1 else "resuming (cached images are skipped)")
        with _WORKSPACE_LOCK:
            summary = workflows.embed(Path(ctx.settings.workspace), Path(p["source"]), p["backbone"], p["name"],
                                      batch_size=int(p.get("batch_size") or 64),
                                      progress_factory=_progress_factory(job))
        return {"name": summary["name"], "n_images": summary["n_images"], "n_new": summary["n_new"],
                "classes": summary["classes"], "splits": summary["splits"], "url": "/build"}

    return run


def _bank(ctx: Any) -> JobHandler:
    def run(job: JobContext) -> dict[str, Any]:
        from ml import workflows

        p = job.params
        root = Path(ctx.settings.workspace)
        with _WORKSPACE_LOCK:
            if p["kind"] == "text":
                job.progress(0.1, "encoding the phrases with the text tower", force=True)
                summary = workflows.text_bank(root, list(p["phrases"]), p["name"], backbone_spec=p["backbone"])
            else:
                summary = workflows.cav_bank(root, Path(p["source"]), p["name"], backbone_spec=p["backbone"],
                                             progress_factory=_progress_factory(job, 0.0, 0.8))
        return {"name": summary["name"], "n_concepts": summary["n_concepts"],
                "mean_heldout_acc": summary.get("mean_heldout_acc"), "url": "/build"}

    return run


def _train(ctx: Any) -> JobHandler:
    def run(job: JobContext) -> dict[str, Any]:
        from app.services.workspace_import import import_model
        from ml import workflows

        p = job.params
        root = Path(ctx.settings.workspace)
        with _WORKSPACE_LOCK:
            workspace = served_workspace(ctx)
            if p["name"] not in workspace.models:  # a resumed job may have trained it already
                job.progress(0.05, "fitting the sparse head (choosing λ on the val split)", force=True)
                lam = p.get("lam")
                workflows.train(root, p["embeddings"], p["bank"], p["name"], hybrid=bool(p.get("hybrid")),
                                lam=None if lam is None else float(lam))
        job.progress(0.8, "registering version 1", force=True)
        with session_scope(ctx.session_factory) as session:
            author = session.get(User, job.created_by) if job.created_by else None
            model_id = import_model(session, ctx, root, p["name"], author=author)
            served_name = session.get(Model, model_id).name  # may differ from the workspace's if taken
        job.progress(0.9, "loading it into the model service", force=True)
        if getattr(ctx, "models", None) is not None:
            ctx.models.get(model_id)
        return {"name": p["name"], "model_id": model_id, "url": url("model", model=served_name)}

    return run


def handlers(ctx: Any) -> dict[str, JobHandler]:
    """The job kinds every app runs unless ``create_app(job_handlers=...)`` says otherwise."""
    return {EMBED: _embed(ctx), BANK: _bank(ctx), TRAIN: _train(ctx)}
