"""Users: who am I, and (admins) manage accounts."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import AdminUser, CurrentUser, SessionDep
from app.schemas import ErrorBody, UserCreate, UserPublic, UserUpdate
from app.services import users as user_service

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser) -> UserPublic:
    return UserPublic.model_validate(user)


@router.get("", response_model=list[UserPublic])
def list_users(admin: AdminUser, session: SessionDep) -> list[UserPublic]:
    return [UserPublic.model_validate(u) for u in user_service.list_users(session)]


@router.post("", response_model=UserPublic, status_code=201, responses={409: {"model": ErrorBody}})
def create_user(body: UserCreate, admin: AdminUser, session: SessionDep) -> UserPublic:
    user = user_service.create_user(session, body.name, body.role, body.password, actor=admin)
    return UserPublic.model_validate(user)


@router.get("/{user_id}", response_model=UserPublic)
def get_user(user_id: int, admin: AdminUser, session: SessionDep) -> UserPublic:
    return UserPublic.model_validate(user_service.get_user(session, user_id))


@router.patch("/{user_id}", response_model=UserPublic)
def update_user(user_id: int, body: UserUpdate, admin: AdminUser, session: SessionDep) -> UserPublic:
    user = user_service.update_user(session, user_id, actor=admin, role=body.role, password=body.password,
                                    is_active=body.is_active)
    return UserPublic.model_validate(user)
