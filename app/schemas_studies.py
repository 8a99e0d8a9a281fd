"""Request and response bodies of the study API (``/api/v1/studies``), as in :mod:`app.schemas`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Tool = Literal["weights", "maps", "preview", "suggestions"]
Visible = Literal["none", "in_distribution", "all"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- researchers ---------------------------------------------------------------------------------

class ConditionIn(_In):
    name: str = Field(min_length=1, max_length=64, examples=["with preview"])
    tools: list[Tool] = Field(default_factory=list, max_length=4,
                              description='Tools of this condition; "weights" is always included.')


class StudyCreate(_In):
    name: str = Field(min_length=1, max_length=128)
    base_model_id: int = Field(ge=1)
    base_version: int | None = Field(default=None, ge=1, description="Default: the model's current version.")
    task: str = Field(min_length=1, max_length=5000, examples=["Make the model work on unusual backgrounds."])
    consent_text: str = Field(default="", max_length=20_000)
    visible_splits: Visible = "in_distribution"
    target_split: str | None = Field(default=None, max_length=64,
                                     description="The held-out split scored, never shown. Default: the shifted one.")
    in_distribution_split: str | None = Field(default=None, max_length=64)
    conditions: list[ConditionIn] | None = Field(
        default=None, max_length=12, description="Between-subject conditions, assigned at random, balanced.")
    tools: list[Tool] | None = Field(default=None, max_length=4, description="Tools when there are no conditions.")
    time_limit_s: int | None = Field(default=None, ge=60, le=7 * 24 * 3600)
    edit_budget: int | None = Field(default=None, ge=1, le=1000, description="Most prunes a participant may keep.")


class StudyUpdate(_In):
    name: str | None = Field(default=None, min_length=1, max_length=128)
    base_model_id: int | None = Field(default=None, ge=1)
    base_version: int | None = Field(default=None, ge=1)
    task: str | None = Field(default=None, min_length=1, max_length=5000)
    consent_text: str | None = Field(default=None, max_length=20_000)
    visible_splits: Visible | None = None
    target_split: str | None = Field(default=None, max_length=64)
    in_distribution_split: str | None = Field(default=None, max_length=64)
    conditions: list[ConditionIn] | None = Field(default=None, max_length=12)
    tools: list[Tool] | None = Field(default=None, max_length=4)
    time_limit_s: int | None = Field(default=None, ge=60, le=7 * 24 * 3600)
    edit_budget: int | None = Field(default=None, ge=1, le=1000)


class Condition(BaseModel):
    name: str
    tools: list[str]


class InvitationCounts(BaseModel):
    unused: int
    used: int


class StudyPublic(BaseModel):
    id: int
    name: str
    owner_id: int
    status: Literal["draft", "open", "closed"]
    base_model_id: int
    base_model: str | None
    base_version: int
    task: str
    consent_text: str
    visible_splits: Visible
    target_split: str
    in_distribution_split: str | None
    shown_splits: list[str] = Field(description="The splits participants see (never the target split).")
    conditions: list[Condition]
    time_limit_s: int | None
    edit_budget: int | None
    created_at: datetime
    opened_at: datetime | None
    closed_at: datetime | None
    invitations: InvitationCounts


class StudyTransition(_In):
    note: str = Field(default="", max_length=500, description="Why, kept in the audit log (optional).")


class InvitationsCreate(_In):
    count: int = Field(ge=1, le=500)


class InvitationsPublic(BaseModel):
    codes: list[str] = Field(description="Single-use codes. Shown once: only their hashes are stored.")
    links: list[str] = Field(description="The join page of each code, relative to the server.")


class ProgressRow(BaseModel):
    pseudonym: str
    condition: str
    status: Literal["active", "time_up", "submitted", "closed"]
    joined_at: datetime
    deadline_at: datetime | None
    submitted_at: datetime | None
    version: int | None
    n_prunes: int
    n_events: int
    last_event_at: datetime | None


# -- participants --------------------------------------------------------------------------------

class JoinRequest(_In):
    code: str = Field(min_length=1, max_length=128)
    consent: bool = Field(description="true: the participant agrees to the study's consent text.")


class StudyTask(BaseModel):
    name: str
    task: str


class Budget(BaseModel):
    total: int | None = Field(description="Most prunes allowed (null: no limit).")
    used: int
    left: int | None


class PruneUnit(BaseModel):
    class_name: str
    concept: str


class JoinedPublic(BaseModel):
    token: str = Field(description="A bearer token for the participant. Shown once.")
    pseudonym: str
    study: StudyTask


class WorkspacePublic(BaseModel):
    study: StudyTask
    pseudonym: str
    tools: list[str]
    splits: list[str] = Field(description="Splits whose accuracy the participant may see.")
    classes: list[str]
    accuracy: dict[str, float | None]
    status: Literal["active", "time_up", "submitted", "closed"]
    version: int
    deadline_at: datetime | None
    seconds_left: int | None
    budget: Budget
    prunes: list[PruneUnit]
    can_undo: bool
    submitted_version: int | None


class ConceptWeight(BaseModel):
    concept: str
    weight: float
    base_weight: float
    pruned: bool


class ClassWeightsPublic(BaseModel):
    class_name: str
    classes: list[str]
    version: int
    concepts: list[ConceptWeight]
    budget: Budget


class ClassWeight(BaseModel):
    class_name: str
    weight: float
    base_weight: float
    pruned: bool


class ConceptDetailPublic(BaseModel):
    concept: str
    source: str
    phrase: str | None
    weights: list[ClassWeight]
    maps: bool = Field(description="Whether example images (the maps tool) are available.")


class ExampleImage(BaseModel):
    image_id: str
    split: str
    label: str
    score: float = Field(description="Standardised concept score.")


class ExamplesPublic(BaseModel):
    concept: str
    images: list[ExampleImage]


class PruneIn(_In):
    concept: str = Field(min_length=1, max_length=256)
    class_name: str = Field(min_length=1, max_length=256)


class PruneRequest(_In):
    base_version: int = Field(ge=1, description="Your model's version the prunes are made on; 409 if it moved.")
    prunes: list[PruneIn] = Field(min_length=1, max_length=50)


class VersionRequest(_In):
    base_version: int = Field(ge=1)


class SubmitRequest(_In):
    version: int | None = Field(default=None, ge=1, description="The version to submit; it must be the current one.")


class SplitPreview(BaseModel):
    name: str
    n: int
    before: float | None
    after: float | None
    delta: float | None
    n_flipped: int
    newly_correct: int
    newly_wrong: int


class StudyPreviewPublic(BaseModel):
    base_version: int
    prunes: list[PruneUnit]
    splits: list[SplitPreview]
    over_budget: bool


class CommitPublic(BaseModel):
    version: int
    prunes: list[PruneUnit]


class UndoPublic(BaseModel):
    version: int
    undone: int | None
    restored: int | None


class SubmitPublic(BaseModel):
    version: int
    submitted_at: datetime


class SuggestionsPublic(BaseModel):
    version: int
    prunes: list[PruneUnit]
    split: str | None = Field(description="The split they were chosen on, when the participant may see it.")


ResultsPublic = dict[str, Any]
