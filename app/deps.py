"""FastAPI dependencies: the app context, a database session, the current user, roles.

Browser requests authenticate with the signed session cookie and must send the session's
CSRF token on every state-changing request; API clients send ``Authorization: Bearer``
and need no CSRF token (a browser never attaches that header on its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy.orm import Session

from app.context import AppContext
from app.errors import Forbidden, Unauthorized
from app.models import Role, User
from app.security import BrowserSession, csrf_matches
from app.services import users as user_service

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def get_context(request: Request) -> AppContext:
    return request.app.state.ctx


ContextDep = Annotated[AppContext, Depends(get_context)]


def get_session(ctx: ContextDep) -> Iterator[Session]:
    session = ctx.session_factory()
    try:
        yield session
    finally:
        session.close()  # rolls back whatever a failed handler left open


SessionDep = Annotated[Session, Depends(get_session)]


def browser_session(request: Request, ctx: ContextDep) -> BrowserSession | None:
    """The signed session cookie's content, or ``None``."""
    return ctx.signer.read(request.cookies.get(ctx.settings.session_cookie_name))


async def submitted_csrf_token(request: Request) -> str | None:
    """The CSRF token a state-changing request carries in its header or form body."""
    if request.method in SAFE_METHODS:
        return None
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(_FORM_TYPES):
        form = await request.form()  # cached on the request, so the handler's Form() fields reuse it
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else None
    return None


def _bearer(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" and credentials.strip() else None


def optional_user(
    request: Request,
    session: SessionDep,
    cookie: Annotated[BrowserSession | None, Depends(browser_session)],
    csrf: Annotated[str | None, Depends(submitted_csrf_token)],
) -> User | None:
    """The authenticated user or ``None``; a bad token or a missing CSRF token is an error."""
    token = _bearer(request)
    if token is not None:
        user = user_service.user_for_token(session, token)
        if user is None:
            raise Unauthorized("invalid or revoked API token", headers={"WWW-Authenticate": "Bearer"})
        request.state.auth = "token"
        return user
    if cookie is None:
        return None
    user = session.get(User, cookie.user_id)
    if user is None or not user.is_active:
        return None
    if request.method not in SAFE_METHODS and not csrf_matches(cookie.csrf_token, csrf):
        raise Forbidden(f"missing or wrong CSRF token (send the {CSRF_HEADER} header or a {CSRF_FIELD} form field)")
    request.state.auth = "cookie"
    request.state.csrf_token = cookie.csrf_token
    return user


OptionalUser = Annotated[User | None, Depends(optional_user)]


def current_user(user: OptionalUser) -> User:
    if user is None:
        raise Unauthorized("log in or send an API token", headers={"WWW-Authenticate": "Bearer"})
    return user


CurrentUser = Annotated[User, Depends(current_user)]


def require_role(*roles: Role) -> Callable[[User], User]:
    """A dependency that admits only users with one of ``roles`` (403 for the others)."""
    allowed = frozenset(roles)

    def check(user: CurrentUser) -> User:
        if user.role not in allowed:
            names = " or ".join(sorted(r.value for r in allowed))
            raise Forbidden(f"this needs the {names} role")
        return user

    return check


AdminUser = Annotated[User, Depends(require_role(Role.ADMIN))]
ResearcherUser = Annotated[User, Depends(require_role(Role.ADMIN, Role.RESEARCHER))]


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def start_browser_session(request: Request, response: Response, ctx: AppContext, user: User) -> str:
    """Set the session cookie for ``user`` on ``response``; returns the session's CSRF token."""
    settings = ctx.settings
    cookie, session = ctx.signer.issue(user.id)
    secure = settings.session_cookie_secure == "always" or (
        settings.session_cookie_secure == "auto" and request.url.scheme == "https"
    )
    response.set_cookie(
        settings.session_cookie_name, cookie, max_age=settings.session_max_age_s, path="/",
        httponly=True, samesite="lax", secure=secure,
    )
    return session.csrf_token


def end_browser_session(response: Response, ctx: AppContext) -> None:
    response.delete_cookie(ctx.settings.session_cookie_name, path="/", httponly=True, samesite="lax")
