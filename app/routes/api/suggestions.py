"""POST /api/v1/models/{id}/suggestions: proposed edits with their previews on every split.

Researchers and admins, like the other model endpoints. Nothing is saved: applying a
proposal is ``POST /api/v1/models/{id}/edits`` with its ``edits`` (they carry ``source``),
so it becomes an ordinary version whose edit record says where the edit came from.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.deps import ContextDep, ResearcherUser
from app.routes.api.inspect import _busy, _models
from app.schemas import SplitPreview
from app.services import suggestions

router = APIRouter(prefix="/models", tags=["suggestions"])


class SuggestionParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # strict: false is no seed, 0 no per_class

    target_split: str | None = Field(default=None, max_length=64,
                                     description="tfti: the split to adapt to (default: the shifted one, else test).")
    source_split: str | None = Field(default=None, max_length=64,
                                     description="tfti: the training split (default train).")
    shots: int = Field(default=4, ge=1, le=64, description="tfti: labelled target images per class.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="tfti: seed of the shot sample.")
    shot_ids: list[str] | None = Field(default=None, max_length=2000,
                                       description="tfti: these target images as the shots instead of a sample.")
    max_source_drop: float = Field(default=0.015, ge=0, le=1,
                                   description="tfti: refuse edits that lower source-split accuracy by more "
                                               "than this (1: no budget).")
    k: int = Field(default=5, ge=1, le=20, description="greedy: at most this many prunes.")
    metric: Literal["accuracy", "worst_group", "balanced_accuracy"] = Field(
        default="accuracy", description="greedy: the metric to maximise.")
    per_class: bool = Field(default=False, description="greedy: also try pruning one class's weight.")
    split: str | None = Field(default=None, max_length=64,
                              description="greedy: the split to search on; spurious: the split to rank on "
                                          "(default: every split pooled).")
    top: int = Field(default=5, ge=1, le=50, description="spurious: how many top-ranked concepts to propose.")


class SuggestionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["tfti", "greedy", "spurious"]
    params: SuggestionParams = Field(default_factory=SuggestionParams)


class ProposalPublic(BaseModel):
    id: int
    source: str = Field(description='"tfti", "greedy" or "spurious"; the edits carry it too.')
    kind: str = Field(description='"mask", "amplify" or "prune".')
    title: str
    concepts: list[str]
    edits: list[dict[str, Any]] = Field(description="Commit these to apply the proposal.")
    evidence: dict[str, Any]
    preview: list[SplitPreview] = Field(description="The effect on every split (and, for tfti, the target "
                                                    "split without the shots).")


class CombinedPublic(BaseModel):
    edits: list[dict[str, Any]]
    preview: list[SplitPreview]


class SuggestionsPublic(BaseModel):
    model_id: int
    version: int = Field(description="The version the proposals are for: commit them on it.")
    method: str
    params: dict[str, Any]
    proposals: list[ProposalPublic]
    combined: CombinedPublic = Field(description="Every proposal together (greedy: the whole path).")
    shots: dict[str, Any] | None = None
    ranking: list[dict[str, Any]] | None = None


@router.post("/{model_id}/suggestions", response_model=SuggestionsPublic, responses=_busy)
def suggest(model_id: int, body: SuggestionRequest, user: ResearcherUser, ctx: ContextDep) -> SuggestionsPublic:
    """Edits proposed from data, each with its preview on every split; nothing is saved."""
    result = suggestions.suggest(_models(ctx), model_id, body.method, body.params.model_dump(),
                                 editor=ctx.head_editor)
    return SuggestionsPublic.model_validate(result)
