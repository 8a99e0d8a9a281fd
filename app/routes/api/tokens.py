"""The caller's own API tokens."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import CurrentUser, SessionDep
from app.schemas import TokenCreate, TokenCreated, TokenPublic
from app.services import users as user_service

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.get("", response_model=list[TokenPublic])
def list_tokens(user: CurrentUser, session: SessionDep) -> list[TokenPublic]:
    return [TokenPublic.model_validate(t) for t in user_service.list_tokens(session, user)]


@router.post("", response_model=TokenCreated, status_code=201)
def create_token(body: TokenCreate, user: CurrentUser, session: SessionDep) -> TokenCreated:
    """A new bearer token for the caller; the token itself is in this response only."""
    token, plain = user_service.create_token(session, user, body.name)
    return TokenCreated.model_validate({**TokenPublic.model_validate(token).model_dump(), "token": plain})


@router.delete("/{token_id}", response_model=TokenPublic)
def revoke_token(token_id: int, user: CurrentUser, session: SessionDep) -> TokenPublic:
    return TokenPublic.model_validate(user_service.revoke_token(session, user, token_id))
