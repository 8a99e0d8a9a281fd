"""User studies: set-up by a researcher, single-use invitations, joining, progress, closing.

A study names a base model version; every participant edits a copy of it (a model of
their own, branched from that version with :func:`history.create_model`). Researchers see
and change only their own studies (admins see all); anyone else gets 404, so a study's
existence does not leak. A closed study is frozen: no joins, edits, submissions or config
changes. What participants do inside a study is in :mod:`app.services.study_work`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db import utcnow, write_transaction
from app.errors import Conflict, Forbidden, InvalidInput, NotFound
from app.models import Dataset, Model, Role, User
from app.models_studies import TOOLS, Participant, Study, StudyEvent, StudyInvitation, StudyStatus, VisibleSplits
from app.security import token_hash
from app.services import audit, history
from app.services.artifacts import ArtifactStore
from app.services.study_events import Actor, record

JOIN_PATH = "/join"
MAX_INVITATIONS = 500  # per request
MAX_CONDITIONS = 12
_CONDITION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")
_CODE_PREFIX = "inv_"
LIMITS = {"name": 128, "task": 5000, "consent_text": 20_000}
MAX_TIME_LIMIT_S = 7 * 24 * 3600
MAX_BUDGET = 1000


# -- configuration -------------------------------------------------------------------------------

def normalise_tools(tools: Iterable[str]) -> list[str]:
    """Tools in canonical order; "weights" is always included (it is what participants edit)."""
    chosen = {str(t).strip().lower() for t in tools if str(t).strip()}
    unknown = sorted(chosen - set(TOOLS))
    if unknown:
        raise InvalidInput(f"unknown tool{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                           f"choose from {', '.join(TOOLS)}")
    chosen.add("weights")
    return [t for t in TOOLS if t in chosen]


def normalise_conditions(conditions: Sequence[Mapping[str, Any]] | None,
                         tools: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """``[{"name", "tools"}]`` checked; without conditions, one called "default" with ``tools``."""
    if not conditions:
        return [{"name": "default", "tools": normalise_tools(tools or ["weights", "preview"])}]
    if len(conditions) > MAX_CONDITIONS:
        raise InvalidInput(f"at most {MAX_CONDITIONS} conditions")
    result, seen = [], set()
    for condition in conditions:
        name = str(condition.get("name") or "").strip()
        if not _CONDITION_NAME.match(name):
            raise InvalidInput(f"invalid condition name {name!r}: use 1-64 letters, digits, spaces, '_', '-' or '.'")
        if name.lower() in seen:
            raise InvalidInput(f"the condition {name!r} is listed twice")
        seen.add(name.lower())
        result.append({"name": name, "tools": normalise_tools(condition.get("tools") or [])})
    return result


def parse_conditions_text(text: str) -> list[dict[str, Any]]:
    """One condition per line, ``name: tool, tool`` (as the study form takes them)."""
    conditions = []
    for number, line in enumerate((text or "").splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        name, colon, tools = line.partition(":")
        if not colon:
            raise InvalidInput(f"condition line {number} needs the form 'name: tool, tool' (tools: {', '.join(TOOLS)})")
        conditions.append({"name": name.strip(), "tools": [t for t in tools.replace(";", ",").split(",")]})
    return conditions


def model_splits(session: Session, model: Model) -> list[str]:
    """The evaluation splits of a model's dataset, as recorded when it was imported."""
    info = session.scalar(select(Dataset.info).where(Dataset.id == model.dataset_id)) or {}
    return sorted((info.get("splits") or {}).keys())


def default_target_split(splits: Sequence[str]) -> str | None:
    """The shifted split when there is one (its name says "shift" or "ood")."""
    return next((s for s in splits if "shift" in s.lower() or "ood" in s.lower()), None)


def default_in_distribution_split(splits: Sequence[str], target: str | None) -> str | None:
    for name in ("test", "val", "validation"):
        if name in splits and name != target:
            return name
    return next((s for s in splits if s not in (target, "train")), None)


def visible_splits(study: Study, splits: Sequence[str] | None = None) -> list[str]:
    """The splits participants may see; never the target split."""
    if study.visible_splits == VisibleSplits.NONE:
        return []
    if study.visible_splits == VisibleSplits.IN_DISTRIBUTION:
        return [study.in_distribution_split] if study.in_distribution_split else []
    return [s for s in (splits or []) if s != study.target_split]


def _text(value: Any, field: str, *, required: bool = True) -> str:
    text = str(value or "").strip()
    if required and not text:
        raise InvalidInput(f"the study needs a {field.replace('_', ' ')}")
    if len(text) > LIMITS[field]:
        raise InvalidInput(f"the {field.replace('_', ' ')} is too long (at most {LIMITS[field]} characters)")
    return text


def _optional_int(value: Any, field: str, low: int, high: int) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{field} must be a whole number from {low} to {high}, or empty for none")
    return value


def _checked_config(session: Session, values: dict[str, Any]) -> dict[str, Any]:
    """Every field of a study, checked against each other and against the base model."""
    model = history.get_model(session, values["base_model_id"])
    if model.head_number < 1:
        raise InvalidInput(f"model {model.name!r} has no versions yet")
    base_version = values.get("base_version") or model.head_number
    history.get_version(session, model.id, base_version)
    splits = model_splits(session, model)
    if not splits:
        raise InvalidInput(f"model {model.name!r} has no evaluation splits on record; import it from a workspace")
    target = values.get("target_split") or default_target_split(splits)
    if target not in splits:
        raise InvalidInput(f"choose the held-out target split among {', '.join(splits)}"
                           + (f" ({target!r} is not one)" if target else ""))
    in_dist = values.get("in_distribution_split") or default_in_distribution_split(splits, target)
    if in_dist is not None and in_dist not in splits:
        raise InvalidInput(f"unknown in-distribution split {in_dist!r}; the splits are {', '.join(splits)}")
    if in_dist == target:
        raise InvalidInput("the in-distribution split cannot be the held-out target split")
    try:
        visible = VisibleSplits(values.get("visible_splits") or VisibleSplits.IN_DISTRIBUTION)
    except ValueError:
        raise InvalidInput("visible splits must be none, in_distribution or all") from None
    if visible == VisibleSplits.IN_DISTRIBUTION and in_dist is None:
        raise InvalidInput("there is no in-distribution split to show; choose visible splits none or all")
    conditions = normalise_conditions(values.get("conditions"), values.get("tools"))
    needs_data = sorted({t for c in conditions for t in c["tools"] if t in ("preview", "maps")})
    if visible == VisibleSplits.NONE and needs_data:
        raise InvalidInput(f"the {' and '.join(needs_data)} tool{'s need' if len(needs_data) > 1 else ' needs'} "
                           "visible splits: choose visible splits in_distribution or all")
    return {
        "name": _text(values.get("name"), "name"), "base_model_id": model.id, "base_version": base_version,
        "task": _text(values.get("task"), "task"), "consent_text": _text(values.get("consent_text"), "consent_text",
                                                                           required=False),
        "visible_splits": visible, "target_split": target, "in_distribution_split": in_dist,
        "conditions": conditions,
        "time_limit_s": _optional_int(values.get("time_limit_s"), "the time limit (seconds)", 60, MAX_TIME_LIMIT_S),
        "edit_budget": _optional_int(values.get("edit_budget"), "the edit budget (prunes)", 1, MAX_BUDGET),
    }


CONFIG_FIELDS = ("name", "base_model_id", "base_version", "task", "consent_text", "visible_splits", "target_split",
                 "in_distribution_split", "conditions", "tools", "time_limit_s", "edit_budget")


def create_study(session: Session, owner: User, **values: Any) -> Study:
    """A new study in draft; see :data:`CONFIG_FIELDS` for what ``values`` may hold."""
    unknown = sorted(set(values) - set(CONFIG_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown study fields: {', '.join(unknown)}")
    if values.get("base_model_id") is None:
        raise InvalidInput("the study needs a base model")
    config = _checked_config(session, values)
    with write_transaction(session):
        study = Study(owner_id=owner.id, status=StudyStatus.DRAFT, **config)
        session.add(study)
        session.flush()
        audit.record(session, "study.create", user=owner, object_type="study", object_id=study.id,
                     payload={"name": study.name, "base_model_id": study.base_model_id,
                              "base_version": study.base_version})
    return study


def update_study(session: Session, user: User, study_id: int, **changes: Any) -> Study:
    """Change a draft study's configuration (an open or closed one is fixed: 409)."""
    study = get_study(session, user, study_id)
    if study.status != StudyStatus.DRAFT:
        raise Conflict(f"study {study.id} is {study.status.value}: its configuration can no longer change")
    unknown = sorted(set(changes) - set(CONFIG_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown study fields: {', '.join(unknown)}")
    current = {f: getattr(study, f) for f in CONFIG_FIELDS if f != "tools"}
    if "base_model_id" in changes and "base_version" not in changes:
        current["base_version"] = None  # a new base model starts from its head
    merged = {**current, **changes}  # None resets a field to its default (no limit, the default split)
    if "tools" in changes and "conditions" not in changes:
        merged["conditions"] = None
    config = _checked_config(session, merged)
    with write_transaction(session):
        study = session.get(Study, study_id)
        assert study is not None
        for field, value in config.items():
            setattr(study, field, value)
        audit.record(session, "study.update", user=user, object_type="study", object_id=study.id,
                     payload={"fields": sorted(changes)})
    return study


# -- who may see a study -------------------------------------------------------------------------

def _may_manage(user: User, study: Study) -> bool:
    return user.role == Role.ADMIN or (user.role == Role.RESEARCHER and study.owner_id == user.id)


def get_study(session: Session, user: User, study_id: int) -> Study:
    """A study its owner (or an admin) manages; 404 for everyone else, so ids do not leak."""
    study = session.get(Study, study_id)
    if study is None or not _may_manage(user, study):
        raise NotFound(f"no study with id {study_id}")
    return study


def list_studies(session: Session, user: User) -> list[Study]:
    query = select(Study).order_by(Study.id.desc())
    if user.role != Role.ADMIN:
        query = query.where(Study.owner_id == user.id)
    return list(session.scalars(query))


def _set_status(session: Session, user: User, study_id: int, wanted: StudyStatus, note: str = "") -> Study:
    allowed = {StudyStatus.OPEN: (StudyStatus.DRAFT,), StudyStatus.CLOSED: (StudyStatus.DRAFT, StudyStatus.OPEN)}
    get_study(session, user, study_id)
    with write_transaction(session):
        study = session.scalar(select(Study).where(Study.id == study_id).with_for_update())
        assert study is not None
        if study.status == wanted:
            return study
        if study.status not in allowed[wanted]:
            raise Conflict(f"study {study.id} is {study.status.value} and cannot be {wanted.value} again")
        study.status = wanted
        if wanted == StudyStatus.OPEN:
            study.opened_at = utcnow()
        else:
            study.closed_at = utcnow()
        audit.record(session, f"study.{'open' if wanted == StudyStatus.OPEN else 'close'}", user=user,
                     object_type="study", object_id=study.id, payload={"note": note[:500]} if note else {})
    return study


def open_study(session: Session, user: User, study_id: int, note: str = "") -> Study:
    """Start the study: invitations can be redeemed from now on."""
    return _set_status(session, user, study_id, StudyStatus.OPEN, note)


def close_study(session: Session, user: User, study_id: int, note: str = "") -> Study:
    """Freeze the study: nobody joins, edits or submits any more, and the configuration is fixed."""
    return _set_status(session, user, study_id, StudyStatus.CLOSED, note)


# -- invitations ---------------------------------------------------------------------------------

def create_invitations(session: Session, user: User, study_id: int, count: int) -> list[str]:
    """``count`` single-use codes; only their hashes are kept, so they are shown this once."""
    study = get_study(session, user, study_id)
    if study.status == StudyStatus.CLOSED:
        raise Conflict(f"study {study.id} is closed: it takes no new participants")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_INVITATIONS:
        raise InvalidInput(f"make 1 to {MAX_INVITATIONS} invitations at a time")
    codes = [_CODE_PREFIX + secrets.token_urlsafe(24) for _ in range(count)]
    with write_transaction(session):
        for code in codes:
            session.add(StudyInvitation(study_id=study.id, code_hash=token_hash(code), prefix=code[:12]))
        audit.record(session, "study.invite", user=user, object_type="study", object_id=study.id,
                     payload={"count": count})
    return codes


def join_path(code: str) -> str:
    return f"{JOIN_PATH}?code={code}"


def invitation_counts(session: Session, study_id: int) -> dict[str, int]:
    rows = session.execute(select(StudyInvitation.used_at.is_(None), func.count())
                           .where(StudyInvitation.study_id == study_id)
                           .group_by(StudyInvitation.used_at.is_(None)))
    counts = {"unused": 0, "used": 0}
    for unused, number in rows:
        counts["unused" if unused else "used"] += number
    return counts


def _invalid_code() -> NotFound:
    return NotFound("this invitation is invalid or has already been used")


def study_for_code(session: Session, code: str) -> Study:
    """The open study an unused invitation code belongs to (for the consent page); spends nothing."""
    if not code or len(code) > 128:
        raise _invalid_code()
    invitation = session.scalar(select(StudyInvitation).where(StudyInvitation.code_hash == token_hash(code)))
    if invitation is None or invitation.used_at is not None:
        raise _invalid_code()
    study = session.get(Study, invitation.study_id)
    assert study is not None
    _check_joinable(study)
    return study


def _check_joinable(study: Study) -> None:
    if study.status == StudyStatus.DRAFT:
        raise Conflict("this study has not started yet; try the invitation again later")
    if study.status == StudyStatus.CLOSED:
        raise Conflict("this study has ended and takes no more participants")


def _pick_condition(session: Session, study: Study) -> str:
    """Random among the conditions with the fewest participants so far: balanced, unpredictable."""
    names = [c["name"] for c in study.conditions]
    counts = dict(session.execute(select(Participant.condition, func.count()).where(Participant.study_id == study.id)
                                  .group_by(Participant.condition)).all())
    fewest = min(counts.get(n, 0) for n in names)
    return secrets.choice([n for n in names if counts.get(n, 0) == fewest])


def _new_pseudonym(session: Session, study_id: int) -> str:
    while True:
        pseudonym = "P" + secrets.token_hex(4)
        taken = session.scalar(select(Participant.id).where(Participant.study_id == study_id,
                                                            Participant.pseudonym == pseudonym))
        if taken is None:
            return pseudonym


def actor(participant: Participant) -> Actor:
    return Actor(study_id=participant.study_id, participant_id=participant.id, pseudonym=participant.pseudonym)


def join(session: Session, artifacts: ArtifactStore, code: str, *, consent: bool) -> tuple[Participant, User]:
    """Redeem an invitation: a participant user (no password), a pseudonym, a condition and a model copy.

    The code is spent in the same transaction that creates the participant, so of two
    concurrent uses exactly one succeeds.
    """
    if consent is not True:
        raise InvalidInput("to take part, agree to the consent text")
    if not code or len(code) > 128:
        raise _invalid_code()
    with write_transaction(session):
        invitation = session.scalar(select(StudyInvitation).where(StudyInvitation.code_hash == token_hash(code)))
        if invitation is None:
            raise _invalid_code()
        # Locking the study row serialises joins, so condition counts stay balanced under PostgreSQL too.
        study = session.scalar(select(Study).where(Study.id == invitation.study_id).with_for_update())
        assert study is not None
        _check_joinable(study)
        now = utcnow()
        spent = session.execute(
            update(StudyInvitation).where(StudyInvitation.id == invitation.id, StudyInvitation.used_at.is_(None))
            .values(used_at=now).execution_options(synchronize_session=False)).rowcount
        if spent != 1:
            raise _invalid_code()
        pseudonym = _new_pseudonym(session, study.id)
        user = User(name=f"study{study.id}-{pseudonym}", role=Role.PARTICIPANT, password_hash=None, is_active=True)
        session.add(user)
        session.flush()
        deadline = now + timedelta(seconds=study.time_limit_s) if study.time_limit_s else None
        participant = Participant(study_id=study.id, user_id=user.id, invitation_id=invitation.id,
                                  pseudonym=pseudonym, condition=_pick_condition(session, study), joined_at=now,
                                  deadline_at=deadline)
        session.add(participant)
        session.flush()
        audit.record(session, "study.join", user=user, object_type="study", object_id=study.id,
                     payload={"pseudonym": pseudonym})
        record(session, actor(participant), "join", study.base_version, {"condition": participant.condition})
    ensure_model(session, artifacts, participant)
    return participant, user


def ensure_model(session: Session, artifacts: ArtifactStore, participant: Participant) -> Model:
    """The participant's own model: a copy of the base version, made once (again after a crash)."""
    if participant.model_id is not None:
        return history.get_model(session, participant.model_id)
    study = session.get(Study, participant.study_id)
    assert study is not None
    base = history.get_model(session, study.base_model_id)
    name = f"study{study.id}-{participant.pseudonym}"
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None or model.created_by_id != participant.user_id:
        version = history.get_version(session, base.id, study.base_version)
        user = session.get(User, participant.user_id)
        model = history.create_model(
            session, artifacts, name=name, kind=base.kind, dataset_id=base.dataset_id, backbone_id=base.backbone_id,
            bank_id=base.bank_id, head=history.version_state(artifacts, version), author=user,
            message=f"study {study.id}: copy of {base.name} v{version.number} for {participant.pseudonym}",
            metrics=version.metrics)
    with write_transaction(session):
        session.execute(update(Participant).where(Participant.id == participant.id, Participant.model_id.is_(None))
                        .values(model_id=model.id).execution_options(synchronize_session=False))
    session.refresh(participant)
    return history.get_model(session, participant.model_id)


# -- participants --------------------------------------------------------------------------------

def participant_of(session: Session, user: User) -> tuple[Participant, Study]:
    """The study participation of a participant user; 403 for other roles, 404 outside any study."""
    if user.role != Role.PARTICIPANT:
        raise Forbidden("this is for study participants; researchers manage studies under /studies")
    participant = session.scalar(select(Participant).where(Participant.user_id == user.id))
    if participant is None:
        raise NotFound("you are not taking part in a study")
    study = session.get(Study, participant.study_id)
    assert study is not None
    return participant, study


def participants(session: Session, study_id: int) -> list[Participant]:
    return list(session.scalars(select(Participant).where(Participant.study_id == study_id)
                                .order_by(Participant.id)))


def participant_status(study: Study, participant: Participant, now: datetime | None = None) -> str:
    """"closed", "submitted", "time_up" or "active"."""
    if participant.submitted_at is not None:
        return "submitted"
    if study.status == StudyStatus.CLOSED:
        return "closed"
    if participant.deadline_at is not None and (now or utcnow()) >= participant.deadline_at:
        return "time_up"
    return "active"


def event_counts(session: Session, study_id: int) -> dict[int, tuple[int, datetime | None]]:
    """Per participant id: how many events are stored and when the last one happened."""
    rows = session.execute(select(StudyEvent.participant_id, func.count(), func.max(StudyEvent.created_at))
                           .where(StudyEvent.study_id == study_id).group_by(StudyEvent.participant_id))
    return {pid: (count, last) for pid, count, last in rows if pid is not None}


def tools_of(study: Study, participant: Participant) -> list[str]:
    for condition in study.conditions:
        if condition["name"] == participant.condition:
            return list(condition["tools"])
    return ["weights"]


def study_summary(session: Session, study: Study) -> dict[str, Any]:
    """The study's configuration, as its researcher sees it."""
    model = session.get(Model, study.base_model_id)
    return {
        "id": study.id, "name": study.name, "owner_id": study.owner_id, "status": study.status.value,
        "base_model_id": study.base_model_id, "base_model": model.name if model else None,
        "base_version": study.base_version, "task": study.task, "consent_text": study.consent_text,
        "visible_splits": study.visible_splits.value, "target_split": study.target_split,
        "in_distribution_split": study.in_distribution_split,
        "shown_splits": visible_splits(study, model_splits(session, model) if model else []),
        "conditions": [dict(c) for c in study.conditions], "time_limit_s": study.time_limit_s,
        "edit_budget": study.edit_budget, "created_at": study.created_at, "opened_at": study.opened_at,
        "closed_at": study.closed_at, "invitations": invitation_counts(session, study.id),
    }
