"""Request and response bodies of the JSON API, in families: ``XCreate`` / ``XUpdate`` / ``XPublic``.

Services never import this module; handlers convert service results into these.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.models import JobStatus, ModelKind, Role


class _In(BaseModel):
    # Strict: a request body must match the published schema's JSON types (no `true` for an
    # integer, no `0` for a boolean, no "1" for a number). Enum fields opt out with
    # Field(strict=False): FastAPI validates parsed JSON, where an enum arrives as its string.
    model_config = ConfigDict(extra="forbid", strict=True)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# -- errors ------------------------------------------------------------------------------

class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable error code, e.g. `not_found`, `version_conflict`.")
    message: str = Field(description="What went wrong, for a person.")
    detail: Any = Field(default=None, description="Extra data: validation errors, the current version on 409, ...")


class ErrorBody(BaseModel):
    error: ErrorInfo


class OkPublic(BaseModel):
    ok: bool = True


# -- health ------------------------------------------------------------------------------

class HealthPublic(BaseModel):
    status: Literal["alive"] = "alive"


class ReadyPublic(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, bool]


# -- users and sessions ------------------------------------------------------------------

class UserCreate(_In):
    name: str = Field(min_length=1, max_length=64, examples=["alice"])
    role: Role = Field(strict=False)
    password: str | None = Field(default=None, min_length=8, max_length=1024)


class UserUpdate(_In):
    role: Role | None = Field(default=None, strict=False)
    password: str | None = Field(default=None, min_length=8, max_length=1024)
    is_active: bool | None = None


class UserPublic(_Out):
    id: int
    name: str
    role: Role
    is_active: bool
    created_at: datetime


class LoginRequest(_In):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class SessionPublic(BaseModel):
    user: UserPublic
    csrf_token: str = Field(description="Send it back as the `X-CSRF-Token` header (or `csrf_token` form field) "
                                        "on every state-changing request made with the session cookie.")


# -- API tokens --------------------------------------------------------------------------

class TokenCreate(_In):
    name: str = Field(min_length=1, max_length=64, examples=["laptop"])


class TokenPublic(_Out):
    id: int
    name: str
    prefix: str = Field(description="The token's first characters, to recognise it.")
    created_at: datetime
    last_used_at: datetime | None
    revoked: bool


class TokenCreated(TokenPublic):
    token: str = Field(description="The bearer token. Shown once: store it now.")


# -- jobs --------------------------------------------------------------------------------

class JobPublic(_Out):
    id: int
    kind: str
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    stage: str
    error: str | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    updated_at: datetime
    finished_at: datetime | None


# -- building: datasets, concept banks, training --------------------------------------------

_ARTIFACT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class DatasetCreate(_In):
    name: str = Field(pattern=_ARTIFACT_NAME, description="Name of the embedded dataset in the workspace.")
    path: str = Field(min_length=1, max_length=1024,
                      description="Folder (ImageFolder) or CSV/Parquet manifest, relative to the data root "
                      "(`PCBM_DATA_ROOT`, default the workspace).")
    backbone: str | None = Field(default=None, max_length=1024,
                                 description="Backbone spec; default the workspace's (required for the first dataset).")
    batch_size: int = Field(default=64, ge=1, le=4096)


class DatasetPublic(BaseModel):
    name: str
    source: str | None = None
    backbone: str | None = None
    classes: list[str] = []
    n_images: int | None = None
    splits: Any = None
    error: str | None = Field(default=None, description="Why the dataset's file cannot be read, if it cannot.")


class BankCreate(_In):
    name: str = Field(pattern=_ARTIFACT_NAME)
    kind: Literal["text", "cav"] = Field(description="`text`: CLIP text concepts from `phrases`; `cav`: concept "
                                         "activation vectors learned from the example images at `examples`.")
    phrases: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(default=None, max_length=5000)
    examples: str | None = Field(default=None, min_length=1, max_length=1024,
                                 description="Concept-example folder or attribute table, relative to the data root.")


class BankPublic(BaseModel):
    name: str
    concepts: list[str]
    sources: list[str] = []
    error: str | None = None


class ModelCreate(_In):
    name: str = Field(pattern=_ARTIFACT_NAME)
    embeddings: str = Field(min_length=1, max_length=64, description="Embedded dataset to train on (its train split).")
    bank: str = Field(min_length=1, max_length=64, description="Concept bank of the bottleneck.")
    hybrid: bool = Field(default=False, description="PCBM-h: add a residual head on the embedding.")
    lam: float | None = Field(default=None, gt=0, le=10, description="L1 strength; default: chosen on the val split.")


# -- models and their history ------------------------------------------------------------

class ModelPublic(_Out):
    id: int
    name: str
    kind: ModelKind
    dataset_id: int
    backbone_id: int
    bank_id: int
    head_version: int = Field(validation_alias="head_number", description="Number of the current version.")
    created_at: datetime


class VersionPublic(_Out):
    id: int
    model_id: int
    number: int
    parent_id: int | None
    edit: dict[str, Any] = Field(description='What made this version: {"op": "initial" | "edit" | "undo" | "revert", ...}.')
    author_id: int | None
    message: str
    created_at: datetime
    weights_hash: str
    metrics: dict[str, Any] | None


class EditOp(_In):
    """One global edit of the head, as ``ml.editing.Edit``."""

    op: Literal["prune", "prune_normalize", "set", "scale", "restore"] = Field(
        description="prune: weight 0; prune_normalize: prune, then rescale the class row to its old L1 norm; "
                    "set: weight = value; scale: weight *= value; restore: the weight of the first version.")
    concept: str = Field(min_length=1, max_length=256)
    class_name: str | None = Field(default=None, max_length=256, description="Only this class; all classes if absent.")
    value: float | None = Field(default=None, allow_inf_nan=False, description="The new weight (set) or factor (scale).")
    source: str | None = Field(default=None, max_length=64, description='Who proposed the edit, e.g. "user".')


class EditCommit(_In):
    base_version: int = Field(ge=1, description="The version the edit was made on; 409 if it is no longer the head.")
    edits: list[EditOp] = Field(min_length=1, max_length=1000)
    message: str = Field(default="", max_length=2000)


class UndoRequest(_In):
    base_version: int = Field(ge=1)
    message: str = Field(default="", max_length=2000)


class RevertRequest(_In):
    base_version: int = Field(ge=1)
    to_version: int = Field(ge=1)
    message: str = Field(default="", max_length=2000)


class TensorChange(BaseModel):
    name: str
    shape_from: list[int] | None
    shape_to: list[int] | None
    changed: int | None
    max_abs_change: float | None


class WeightChange(BaseModel):
    class_index: int
    class_name: str | None
    concept_index: int
    concept_name: str | None
    before: float
    after: float


class DiffPublic(BaseModel):
    model_id: int
    from_version: int
    to_version: int
    tensors: list[TensorChange]
    weight_changes: list[WeightChange]
    truncated: bool
    config_changes: dict[str, list[Any]]


# -- inspecting a served model -----------------------------------------------------------

class ConceptWeightPublic(BaseModel):
    concept: str
    index: int = Field(description="Column of the concept in the bank and the head.")
    source: str = Field(description='Where the concept comes from: "text", "cav" or "discovered".')
    weight: float | None = Field(description="Weight for the requested class (null when no class was given).")
    weights: dict[str, float] | None = Field(description="Weight per class (null when a class was given).")
    max_abs_weight: float = Field(description="Largest |weight| over all classes.")
    quality: float | None = Field(description="Held-out CAV accuracy or text AUROC, when known.")
    quality_kind: str | None


class ConceptWeightsPublic(BaseModel):
    model_id: int
    version: int
    classes: list[str]
    class_name: str | None
    q: str
    sort: str
    order: Literal["asc", "desc"]
    total: int = Field(description="Concepts matching `q` (before `limit`).")
    concepts: list[ConceptWeightPublic]


class HeadMatrixPublic(BaseModel):
    model_id: int
    version: int
    classes: list[str]
    concepts: list[str]
    weights: list[list[float]] = Field(description="classes x concepts, in the orders above.")
    bias: list[float]
    nonzero_concepts: list[str] = Field(description="Concepts with a non-zero weight for some class.")


class PreviewRequest(_In):
    base_version: int = Field(ge=1, description="The version the edits are made on; 409 if it is no longer the head.")
    edits: list[EditOp] = Field(min_length=1, max_length=1000)


class BeforeAfter(BaseModel):
    before: float | None
    after: float | None
    delta: float | None


class WorstGroup(BaseModel):
    group: str
    accuracy: float


class WorstGroupChange(BaseModel):
    before: WorstGroup | None
    after: WorstGroup | None
    delta: float | None


class NamedAccuracy(BaseModel):
    name: str
    n: int = Field(description="Images of this class or group in the split.")
    before: float | None
    after: float | None


class FlippedImage(BaseModel):
    image_id: str
    label: str
    before: str = Field(description="Predicted class before the edits.")
    after: str = Field(description="Predicted class after the edits.")


class SplitPreview(BaseModel):
    name: str
    n: int
    accuracy: BeforeAfter
    balanced_accuracy: BeforeAfter
    worst_group: WorstGroupChange
    groups: list[NamedAccuracy]
    classes: list[NamedAccuracy]
    n_flipped: int = Field(description="Images whose prediction changes.")
    newly_correct: int
    newly_wrong: int
    flipped: list[FlippedImage] = Field(description="A capped sample of the images whose prediction changes.")
    flipped_truncated: bool


class PreviewPublic(BaseModel):
    model_id: int
    base_version: int
    edits: list[dict[str, Any]]
    records: list[dict[str, Any]] = Field(description="Every weight each edit would change (old and new).")
    changed_concepts: list[str]
    splits: list[SplitPreview]


class ImageItem(BaseModel):
    image_id: str = Field(description="Path of the image relative to the dataset root.")
    label: str
    predicted: str
    correct: bool
    confidence: float
    group: str | None


class ImageFilters(BaseModel):
    label: str | None
    predicted: str | None
    correct: bool | None
    group: str | None


class ImageOptions(BaseModel):
    splits: list[str]
    classes: list[str]
    groups: list[str]


class ImagePagePublic(BaseModel):
    model_id: int
    version: int
    split: str
    filters: ImageFilters
    total: int = Field(description="Images matching the filters.")
    page: int
    per_page: int
    pages: int
    items: list[ImageItem]
    options: ImageOptions


class ClassProbability(BaseModel):
    class_name: str
    probability: float


class ConceptScore(BaseModel):
    concept: str
    score: float = Field(description="The concept score (signed distance to the concept's hyperplane).")
    standardized: float = Field(description="The score as the head sees it, (score - mean) / scale.")


class Contribution(BaseModel):
    concept: str
    weight: float
    score: float = Field(description="Standardised score.")
    contribution: float = Field(description="weight x score; negative: the concept speaks against the class.")


class PredictionPublic(BaseModel):
    model_id: int
    version: int
    predicted: str
    confidence: float
    probabilities: list[ClassProbability] = Field(description="Every class, most probable first.")
    concept_scores: list[ConceptScore]
    explained_class: str
    logit: float = Field(description="bias + sum of contributions (+ residual for PCBM-h).")
    bias: float
    residual: float | None = Field(description="PCBM-h only: the residual layer's share of the logit.")
    contributions: list[Contribution] = Field(description="Largest |contribution| first.")


class ImageDetailPublic(PredictionPublic):
    image_id: str
    split: str
    label: str
    group: str | None
    correct: bool


class UploadPredictionPublic(PredictionPublic):
    width: int
    height: int


class WhatIfRequest(_In):
    id: str = Field(min_length=1, max_length=1024, description="The image id.")
    concept: str = Field(min_length=1, max_length=256)
    score: float = Field(ge=-1e6, le=1e6, allow_inf_nan=False,
                         description="The concept score to try, in concept-score units.")


class WhatIfProbability(BaseModel):
    class_name: str
    before: float
    after: float


class WhatIfPublic(BaseModel):
    model_id: int
    version: int
    image_id: str
    concept: str
    score_before: float
    score_after: float
    predicted_before: str
    predicted_after: str
    changed: bool
    probabilities: list[WhatIfProbability]
