"""Browser session routes that are not pages: the one-time login link."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse

from app.deps import ContextDep, SessionDep, start_browser_session
from app.schemas import ErrorBody
from app.services import users as user_service

router = APIRouter(tags=["session"])


@router.get("/login/once", response_class=RedirectResponse, status_code=303,
            responses={401: {"model": ErrorBody, "description": "Invalid, expired or used link"}})
def login_once(
    request: Request, ctx: ContextDep, session: SessionDep, token: str = Query(min_length=1, max_length=128)
) -> RedirectResponse:
    """Spend a one-time login link (as printed by `pcbm demo`), start a session, go to `/`."""
    user = user_service.redeem_login_link(session, token)
    response = RedirectResponse("/", status_code=303)
    start_browser_session(request, response, ctx, user)
    response.headers["Referrer-Policy"] = "no-referrer"  # keep the spent token out of Referer headers
    response.headers["Cache-Control"] = "no-store"
    return response
