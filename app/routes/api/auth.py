"""Password login and logout for browsers (session cookie + CSRF token)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import ContextDep, CurrentUser, SessionDep, client_ip, end_browser_session, start_browser_session
from app.errors import Unauthorized
from app.schemas import ErrorBody, LoginRequest, OkPublic, SessionPublic, UserPublic
from app.services import users as user_service

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/login", response_model=SessionPublic, responses={429: {"model": ErrorBody}})
def login(body: LoginRequest, request: Request, response: Response, ctx: ContextDep, session: SessionDep) -> SessionPublic:
    """Check a password and set the session cookie; failures are rate limited per user and IP."""
    user = user_service.login(session, ctx.login_limiter, body.name, body.password, client_ip(request))
    csrf_token = start_browser_session(request, response, ctx, user)
    return SessionPublic(user=UserPublic.model_validate(user), csrf_token=csrf_token)


@router.post("/logout", response_model=OkPublic)
def logout(user: CurrentUser, response: Response, ctx: ContextDep) -> OkPublic:
    """End the browser session (needs the CSRF token like every state-changing request)."""
    end_browser_session(response, ctx)
    return OkPublic()


@router.get("/session", response_model=SessionPublic)
def current_session(user: CurrentUser, request: Request) -> SessionPublic:
    """The logged-in user and the session's CSRF token (browser sessions only)."""
    csrf_token = getattr(request.state, "csrf_token", None)
    if csrf_token is None:
        raise Unauthorized("this request did not use a browser session")
    return SessionPublic(user=UserPublic.model_validate(user), csrf_token=csrf_token)
