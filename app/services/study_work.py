"""What a participant does in a study: read the task, inspect concepts, preview, prune, undo, submit.

Every function takes the participant (from :func:`studies.participant_of`), so nothing
here can reach another participant's model, and logs one event per action. Scores and
previews use the *base* model's cached splits in the model service with the participant's
head swapped in, so participants' copies never need loading of their own. Participants see
only the splits the study shows them (:func:`studies.visible_splits`), never the target.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.db import utcnow, write_transaction
from app.errors import AppError, Conflict, Forbidden, InvalidInput, NotFound, VersionConflict
from app.models import Model, User
from app.models_studies import Participant, Study, StudyStatus
from app.services import history, inspect, studies
from app.services.artifacts import ArtifactStore
from app.services.head_editing import HeadState
from app.services.ml_editing import MlHeadEditor
from app.services.model_service import LoadedModel, ModelService
from app.services.study_analysis import cached_state, head_logits, oracle_prunes, prune_candidates, pruned_units, score
from app.services.study_events import StudyEventLog, record
from ml.errors import PCBMError

log = logging.getLogger(__name__)

MAX_PRUNES_PER_EDIT = 50
SUGGESTIONS = 5
EXAMPLES_PER_SPLIT = 6

@dataclass(frozen=True)
class Work:
    """A participant's situation at one moment: their model's head and the base it started from."""

    study: Study
    participant: Participant
    model: Model
    entry: LoadedModel  # the base model in the model service (its cached splits)
    version: int
    state: HeadState
    base_weight: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:
        return self.state.tensors["weight"]

    @property
    def prunes(self) -> list[tuple[int, int]]:
        return pruned_units(self.base_weight, self.weight)

    def unit(self, unit: tuple[int, int]) -> dict[str, str]:
        return {"class_name": self.entry.classes[unit[0]], "concept": self.entry.concept_names[unit[1]]}

    @property
    def actor(self) -> studies.Actor:
        return studies.actor(self.participant)


def load(session: Session, svc: ModelService, artifacts: ArtifactStore, study: Study,
         participant: Participant) -> Work:
    model = studies.ensure_model(session, artifacts, participant)
    session.refresh(model)
    head = history.get_version(session, model.id, model.head_number)
    first = history.get_version(session, model.id, 1)
    state, base = cached_state(artifacts, head), cached_state(artifacts, first)
    # End the read transaction before the model service opens a session of its own: a request
    # then holds one pooled connection at a time, so many participants cannot exhaust the pool.
    session.commit()
    return Work(study=study, participant=participant, model=model, entry=svc.get(study.base_model_id),
                version=model.head_number, state=state, base_weight=base.tensors["weight"])


def shown_splits(work: Work) -> list[str]:
    return [s for s in studies.visible_splits(work.study, sorted(work.entry.splits)) if s in work.entry.splits]


def _require_tool(work: Work, tool: str) -> None:
    if tool not in studies.tools_of(work.study, work.participant):
        raise Forbidden(f"the {tool} tool is not part of this study for you")


def _require_active(work: Work, *, allow_time_up: bool = False) -> None:
    study, participant = work.study, work.participant
    if study.status == StudyStatus.CLOSED:
        raise Conflict("the study is closed: nothing can be changed any more")
    if study.status != StudyStatus.OPEN:
        raise Conflict("the study has not started yet")
    if participant.submitted_at is not None:
        raise Conflict("you have submitted your model: nothing can be changed any more")
    if not allow_time_up and studies.participant_status(study, participant) == "time_up":
        raise Conflict("the time limit has passed: submit your model as it is")


def budget(work: Work) -> dict[str, int | None]:
    used = len(work.prunes)
    total = work.study.edit_budget
    return {"total": total, "used": used, "left": None if total is None else max(0, total - used)}


def _parse_prunes(work: Work, prunes: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    if not prunes:
        raise InvalidInput("choose a concept to prune")
    if len(prunes) > MAX_PRUNES_PER_EDIT:
        raise InvalidInput(f"at most {MAX_PRUNES_PER_EDIT} prunes at a time")
    units = []
    for prune in prunes:
        concept, class_name = prune.get("concept"), prune.get("class_name")
        if concept not in work.entry.concept_names:
            raise InvalidInput(f"unknown concept {concept!r}")
        if class_name not in work.entry.classes:
            raise InvalidInput(f"unknown class {class_name!r}; prune a concept for one class")
        unit = (work.entry.classes.index(class_name), work.entry.concept_names.index(concept))
        if unit not in units:
            units.append(unit)
    return units


def _edits(work: Work, units: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    return [{"op": "prune", **work.unit(u), "source": "participant"} for u in units]


def _check_version(work: Work, base_version: int) -> None:
    if base_version != work.version:
        raise VersionConflict(f"your model is at version {work.version}, not {base_version}; reload the page",
                              detail={"current_version": {"number": work.version}})


def _editor(work: Work) -> MlHeadEditor:
    bank = work.entry.model.bank
    return MlHeadEditor(lambda _info: bank)


def _new_prunes(work: Work, units: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    done = set(work.prunes)
    fresh = [u for u in units if u not in done]
    if not fresh:
        raise InvalidInput("those concepts are already pruned")
    zero = [u for u in fresh if float(work.base_weight[u]) == 0.0]
    if zero:
        unit = work.unit(zero[0])
        raise InvalidInput(f"“{unit['concept']}” has no weight for {unit['class_name']}: there is nothing to prune")
    if work.study.edit_budget is not None and len(done) + len(fresh) > work.study.edit_budget:
        left = max(0, work.study.edit_budget - len(done))
        raise Conflict(f"that is over your edit budget: {left} of {work.study.edit_budget} prunes left")
    return fresh


# -- reading ---------------------------------------------------------------------------------------

def status(work: Work) -> dict[str, Any]:
    """The timer, the budget and the version: what the workspace header shows."""
    deadline = work.participant.deadline_at
    seconds_left = None if deadline is None else max(0, int((deadline - utcnow()).total_seconds()))
    return {"status": studies.participant_status(work.study, work.participant), "version": work.version,
            "deadline_at": deadline, "seconds_left": seconds_left, "budget": budget(work),
            "prunes": [work.unit(u) for u in work.prunes], "can_undo": work.version > 1,
            "submitted_version": work.participant.submitted_version}


def workspace(work: Work, events: StudyEventLog | None = None, page: str | None = None) -> dict[str, Any]:
    """The task, the tools, the classes and the current accuracy on the splits the participant may see."""
    accuracy = {name: score(work.entry.splits[name], work.weight, work.state.tensors["bias"])["accuracy"]
                for name in shown_splits(work)}
    if events is not None and page is not None:
        events.log(work.actor, "page_view", work.version, {"page": page})
    return {"study": {"name": work.study.name, "task": work.study.task},
            "pseudonym": work.participant.pseudonym, "tools": studies.tools_of(work.study, work.participant),
            "splits": shown_splits(work), "classes": list(work.entry.classes), "accuracy": accuracy,
            **status(work)}


def class_weights(work: Work, class_name: str | None, events: StudyEventLog | None = None) -> dict[str, Any]:
    """The concepts with a weight for ``class_name`` in the base model, strongest first."""
    classes = work.entry.classes
    if class_name is not None and class_name not in classes:
        raise InvalidInput(f"unknown class {class_name!r}")
    chosen = class_name or classes[0]
    k = classes.index(chosen)
    rows = []
    for c, name in enumerate(work.entry.concept_names):
        base = float(work.base_weight[k, c])
        if base != 0.0:
            weight = float(work.weight[k, c])
            rows.append({"concept": name, "weight": weight, "base_weight": base, "pruned": weight == 0.0})
    rows.sort(key=lambda r: (-abs(r["base_weight"]), r["concept"]))
    if events is not None:
        events.log(work.actor, "class_view", work.version, {"class_name": chosen})
    return {"class_name": chosen, "classes": list(classes), "version": work.version, "concepts": rows,
            "budget": budget(work)}


def concept_detail(work: Work, concept: str, events: StudyEventLog | None = None) -> dict[str, Any]:
    """One concept: its weight for every class now and in the base model, and what it is."""
    if concept not in work.entry.concept_names:
        raise NotFound(f"no concept {concept!r}")
    c = work.entry.concept_names.index(concept)
    bank = work.entry.model.bank
    info = bank.info[c] if c < len(bank.info) else {}
    weights = [{"class_name": name, "weight": float(work.weight[k, c]), "base_weight": float(work.base_weight[k, c]),
                "pruned": float(work.base_weight[k, c]) != 0.0 and float(work.weight[k, c]) == 0.0}
               for k, name in enumerate(work.entry.classes)]
    if events is not None:
        events.log(work.actor, "concept_inspect", work.version, {"concept": concept})
    return {"concept": concept, "source": bank.sources[c] if c < len(bank.sources) else "text",
            "phrase": (info or {}).get("phrase"), "weights": weights,
            "maps": "maps" in studies.tools_of(work.study, work.participant)}


def concept_examples(work: Work, concept: str, events: StudyEventLog | None = None) -> dict[str, Any]:
    """The images of the shown splits where ``concept`` is strongest (the maps tool)."""
    _require_tool(work, "maps")
    if concept not in work.entry.concept_names:
        raise NotFound(f"no concept {concept!r}")
    c = work.entry.concept_names.index(concept)
    images = []
    for name in shown_splits(work):
        split = work.entry.splits[name]
        scores = split.cache.features_t[c]
        for row in scores.argsort(descending=True)[:EXAMPLES_PER_SPLIT].tolist():
            images.append({"image_id": split.image_ids[row], "split": name,
                           "label": work.entry.classes[int(split.cache.labels[row])], "score": float(scores[row])})
    if events is not None:
        events.log(work.actor, "map_open", work.version, {"concept": concept, "images": len(images)})
    return {"concept": concept, "images": images}


def image_png(work: Work, svc: ModelService, image_id: str, max_side: int | None,
              concept: str | None = None) -> tuple[bytes, str]:
    """An image of a shown split (maps tool), re-encoded; with ``concept``, its concept map over it
    when the backbone can make one (else the image alone). Any other image is "not found"."""
    _require_tool(work, "maps")
    found = work.entry.index.get(image_id)
    if found is None or found[0] not in shown_splits(work):
        raise NotFound("no such image")
    if concept:
        if concept not in work.entry.concept_names:
            raise NotFound(f"no concept {concept!r}")
        try:
            from app.services.maps import map_service

            maps = map_service(svc)
            picture = maps.image(work.entry, image_id)
            kind, _, grid = maps.maps(work.entry, picture, [concept], [])["maps"][0]
            return maps.overlay_png(picture, kind, grid, 0.5, max_side or 320), "image/png"
        except (AppError, PCBMError, OSError, ImportError) as exc:  # no map: the image itself still helps
            log.info("no concept map for a study image: %s", getattr(exc, "message", exc))
    return inspect.image_file(svc, work.study.base_model_id, image_id, max_side=max_side)


def suggestions(work: Work, svc: ModelService, events: StudyEventLog | None = None) -> dict[str, Any]:
    """Prunes that would raise accuracy the most on the in-distribution split (never the target)."""
    _require_tool(work, "suggestions")
    split_name = work.study.in_distribution_split
    split = work.entry.splits.get(split_name) if split_name else None
    left = budget(work)["left"]
    k = SUGGESTIONS if left is None else min(SUGGESTIONS, left)
    chosen: list[tuple[int, int]] = []
    if split is not None and k > 0:
        with svc.preview_limit.slot(), torch.no_grad():
            chosen = oracle_prunes(svc.with_head(work.entry, work.state), split, prune_candidates(work.weight), k)
    prunes = [work.unit(u) for u in chosen]
    if events is not None:
        events.log(work.actor, "suggestions_view", work.version, {"prunes": prunes})
    return {"version": work.version, "prunes": prunes,
            "split": split_name if split_name in shown_splits(work) else None}


# -- changing ------------------------------------------------------------------------------------

def _refused(work: Work, events: StudyEventLog | None, action: str, exc: AppError,
             prunes: Sequence[Mapping[str, Any]] = ()) -> None:
    if events is not None:
        events.log(work.actor, "action_refused", work.version,
                   {"action": action, "reason": exc.message, "status": exc.status_code,
                    "prunes": [{"class_name": p.get("class_name"), "concept": p.get("concept")} for p in prunes]})


def preview(work: Work, svc: ModelService, base_version: int, prunes: Sequence[Mapping[str, Any]],
            events: StudyEventLog | None = None) -> dict[str, Any]:
    """What pruning would do on the shown splits (the preview tool); nothing is saved."""
    from ml.evaluation import preview_edits

    try:
        _require_active(work)
        _require_tool(work, "preview")
        _check_version(work, base_version)
        units = _parse_prunes(work, prunes)
    except AppError as exc:
        _refused(work, events, "preview", exc, prunes)
        raise
    done = set(work.prunes)
    fresh = [u for u in units if u not in done]
    total = work.study.edit_budget
    with svc.preview_limit.slot():
        outcome = _editor(work)(history_info(work), work.state, _edits(work, fresh)) if fresh else None
        before = svc.with_head(work.entry, work.state)
        after = svc.with_head(work.entry, outcome.state) if outcome else before
        splits = []
        with torch.no_grad():
            for name in shown_splits(work):
                result = preview_edits(work.entry.splits[name].cache, before, after, max_flips=0)
                splits.append({"name": name, "n": result["before"]["n"],
                               "before": result["before"]["accuracy"], "after": result["after"]["accuracy"],
                               "delta": result["delta"]["accuracy"], "n_flipped": result["flips"]["count"],
                               "newly_correct": result["flips"]["newly_correct"],
                               "newly_wrong": result["flips"]["newly_wrong"]})
    chosen = [work.unit(u) for u in units]
    if events is not None:
        events.log(work.actor, "preview", work.version,
                   {"prunes": chosen, "accuracy": {s["name"]: [s["before"], s["after"]] for s in splits}})
    return {"base_version": work.version, "prunes": chosen, "splits": splits,
            "over_budget": total is not None and len(done) + len(fresh) > total}


def history_info(work: Work) -> Any:
    from app.services.head_editing import ModelInfo

    return ModelInfo(model_id=work.model.id, kind=work.model.kind.value, concept_names=list(work.entry.concept_names),
                     class_names=list(work.entry.classes))


def _record_after(session: Session, events: StudyEventLog | None, work: Work, kind: str, version: int,
                  payload: dict[str, Any]) -> None:
    """The event of a change just committed, stored now; if the database refuses it for the moment,
    the event log's writer keeps retrying it, so the change is never left without its event."""
    try:
        with write_transaction(session):
            record(session, work.actor, kind, version, payload)
    except SQLAlchemyError:
        if events is None:
            raise
        log.warning("storing a %s event failed; the event log will retry it", kind)
        events.log(work.actor, kind, version, payload)


def commit(session: Session, artifacts: ArtifactStore, work: Work, user: User, base_version: int,
           prunes: Sequence[Mapping[str, Any]], events: StudyEventLog | None = None) -> dict[str, Any]:
    """Prune concepts on the participant's model: a new version, within the edit budget."""
    try:
        _require_active(work)
        _check_version(work, base_version)
        fresh = _new_prunes(work, _parse_prunes(work, prunes))
    except AppError as exc:
        _refused(work, events, "commit", exc, prunes)
        raise
    edits = _edits(work, fresh)
    editor = _editor(work)
    outcome = editor(history_info(work), work.state, edits)
    metrics = {name: split.cache.report(head_logits(split, outcome.state.tensors["weight"],
                                                    outcome.state.tensors["bias"]))
               for name, split in work.entry.splits.items()}
    try:
        version = history.commit_edit(session, artifacts, work.model.id, base_version, edits, author=user,
                                      editor=editor, metrics=metrics,
                                      message="prune " + ", ".join(f"{e['concept']} for {e['class_name']}"
                                                                   for e in edits))
    except AppError as exc:
        _refused(work, events, "commit", exc, prunes)
        raise
    _record_after(session, events, work, "edit_commit", version.number,
                  {"base_version": base_version,
                   "prunes": [{"class_name": e["class_name"], "concept": e["concept"]} for e in edits]})
    return {"version": version.number, "prunes": [work.unit(u) for u in fresh]}


def undo(session: Session, artifacts: ArtifactStore, work: Work, user: User, base_version: int,
         events: StudyEventLog | None = None) -> dict[str, Any]:
    """A new version with the weights the current one's parent had (the participant's last change undone)."""
    try:
        _require_active(work)
        _check_version(work, base_version)
        version = history.undo(session, artifacts, work.model.id, base_version, author=user)
    except AppError as exc:
        _refused(work, events, "undo", exc)
        raise
    _record_after(session, events, work, "edit_undo", version.number,
                  {"undone": version.edit.get("undone"), "restored": version.edit.get("restored")})
    return {"version": version.number, "undone": version.edit.get("undone"), "restored": version.edit.get("restored")}


def submit(session: Session, work: Work, version: int | None = None,
           events: StudyEventLog | None = None) -> dict[str, Any]:
    """Hand in the current version as the final one (also after the time limit, not after closing)."""
    try:
        _require_active(work, allow_time_up=True)
        if version is not None:
            _check_version(work, version)
    except AppError as exc:
        _refused(work, events, "submit", exc)
        raise
    with write_transaction(session):
        now = utcnow()
        done = session.execute(
            update(Participant).where(Participant.id == work.participant.id, Participant.submitted_at.is_(None))
            .values(submitted_at=now, submitted_version=work.version).execution_options(synchronize_session=False)
        ).rowcount
        if done != 1:
            raise Conflict("you have submitted your model already")
        current = session.scalar(select(Model.head_number).where(Model.id == work.model.id))
        if current != work.version:
            raise VersionConflict(f"your model moved on to version {current}; reload the page and submit again")
        record(session, work.actor, "submit", work.version, {"n_prunes": len(work.prunes)})
    session.refresh(work.participant)
    return {"version": work.version, "submitted_at": now}
