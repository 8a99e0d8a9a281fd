"""Signing in with a name and password, and signing out.

The sign-in form is protected against login CSRF (a site signing a victim into the
attacker's account) with a double-submit token: a random value in a short-lived cookie
that the form must repeat. There is no session yet whose token could be used instead.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, Response

from app.deps import ContextDep, OptionalUser, SessionDep, client_ip, end_browser_session, start_browser_session
from app.errors import RateLimited, Unauthorized
from app.routes.pages.common import PageRoute, PageUser, redirect, render, safe_next
from app.security import csrf_matches
from app.services import users as user_service
from app.templating import PAGE_ROUTES, url

router = APIRouter(route_class=PageRoute)

LOGIN_CSRF_COOKIE = "pcbm_login_csrf"
_LOGIN_CSRF_MAX_AGE_S = 2 * 3600


def _login_page(request: Request, status_code: int = 200, *, error: str = "", username: str = "",
                next_path: str | None = None, headers: dict[str, str] | None = None) -> HTMLResponse:
    token = secrets.token_urlsafe(32)
    response = render(request, "login.html", {
        "csrf_token": token, "error": error, "username": username[:64], "next": safe_next(next_path) or "",
    }, status_code=status_code, headers=headers)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, max_age=_LOGIN_CSRF_MAX_AGE_S, path=url("login"),
                        httponly=True, samesite="strict")
    return response


@router.get(PAGE_ROUTES["login"], response_class=HTMLResponse)
def login_form(request: Request, user: OptionalUser,
               next: Annotated[str | None, Query(max_length=2000)] = None) -> Response:
    """The sign-in form; someone already signed in goes straight on."""
    if user is not None:
        return redirect(safe_next(next) or url("home"))
    return _login_page(request, next_path=next)


@router.post(PAGE_ROUTES["login"], response_class=HTMLResponse)
def login_submit(
    request: Request, ctx: ContextDep, session: SessionDep,
    username: Annotated[str, Form(max_length=256)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    csrf_token: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Check the password (failures are rate limited per name and client IP) and start a session."""
    if not csrf_matches(request.cookies.get(LOGIN_CSRF_COOKIE, ""), csrf_token):
        return _login_page(request, 403, error="This sign-in form has expired. Please sign in again.",
                           username=username, next_path=next)
    if not username or not password:
        return _login_page(request, 422, error="Enter your name and password.", username=username, next_path=next)
    try:
        user = user_service.login(session, ctx.login_limiter, username, password, client_ip(request))
    except RateLimited as exc:
        return _login_page(request, 429, error=exc.message.capitalize() + ".", username=username,
                           next_path=next, headers=exc.headers)
    except Unauthorized:
        return _login_page(request, 401, error="Wrong name or password.", username=username, next_path=next)
    response = redirect(safe_next(next) or url("home"))
    start_browser_session(request, response, ctx, user)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path=url("login"), httponly=True, samesite="strict")
    return response


@router.post(PAGE_ROUTES["logout"], response_class=HTMLResponse)
def logout(user: PageUser, ctx: ContextDep) -> Response:
    """End the browser session (the form carries the session's CSRF token)."""
    response = redirect(url("login"), flash=("info", "You are signed out."))
    end_browser_session(response, ctx)
    return response
