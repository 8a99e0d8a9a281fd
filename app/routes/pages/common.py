"""What every page route shares: HTML errors, sign-in redirects, rendering, flashes, models by name.

Pages are thin like the JSON API: parse, authorise, call a service, render a template.
They differ from the API in how failures look: a page route answers with ``error.html``
(or a redirect to the sign-in page) instead of the JSON error body, which
:class:`PageRoute` arranges for every route of the page router.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.deps import OptionalUser
from app.errors import AppError, Forbidden, NotFound
from app.middleware import BodyTooLarge
from app.models import Model, Role, User
from app.templating import make_templates, url
from ml.errors import DataError, PCBMError

log = logging.getLogger(__name__)

FLASH_COOKIE = "pcbm_flash"
FLASH_LEVELS = ("info", "success", "warning", "error")
STAFF_ROLES = (Role.ADMIN, Role.RESEARCHER)


@functools.lru_cache(maxsize=1)
def templates():
    """The page templates (autoescaping, the ``url`` global); stateless, so shared by every app."""
    return make_templates()


class LoginRequired(Exception):
    """The page needs a signed-in user; :class:`PageRoute` answers with a redirect to the sign-in page."""


# ---------------------------------------------------------------- redirects and the `next` target
def safe_next(value: str | None) -> str | None:
    """``value`` if it is a path on this site (``/models/x?class=y``), else ``None``.

    Refuses absolute and scheme-relative URLs (``https://evil``, ``//evil``), backslashes
    (browsers read ``/\\evil`` as ``//evil``), control characters and over-long values, so
    the sign-in page can never send a user off-site.
    """
    if not value or len(value) > 2000 or not value.startswith("/") or value.startswith("//"):
        return None
    if "\\" in value or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        return None
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return None
    return value


def login_url(next_path: str | None = None) -> str:
    target = safe_next(next_path)
    return url("login") + ("?" + urlencode({"next": target}) if target and target != "/" else "")


def redirect(location: str, flash: tuple[str, str] | None = None) -> RedirectResponse:
    """A 303 to ``location`` (so a POST is followed by a GET), with an optional flash message."""
    response = RedirectResponse(location, status_code=303)
    if flash is not None:
        set_flash(response, *flash)
    return response


def _login_redirect(request: Request) -> Response:
    target = None
    if request.method == "GET":
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.headers.get("HX-Request"):  # a fragment's URL is no page to come back to
            target = request.headers.get("HX-Current-URL") and urlsplit(request.headers["HX-Current-URL"]).path
    location = login_url(target)
    if request.headers.get("HX-Request"):
        return Response(status_code=401, headers={"HX-Redirect": location})
    return RedirectResponse(location, status_code=303)


# ---------------------------------------------------------------- flash messages
def set_flash(response: Response, level: str, text: str) -> None:
    """A one-shot message shown by the next full page (kept in a short-lived cookie)."""
    payload = json.dumps({"level": level if level in FLASH_LEVELS else "info", "text": text[:500]})
    response.set_cookie(FLASH_COOKIE, base64.urlsafe_b64encode(payload.encode()).decode(), max_age=120,
                        path="/", httponly=True, samesite="lax")


def read_flash(request: Request) -> list[dict[str, str]]:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw or len(raw) > 2000:
        return []
    try:
        data = json.loads(base64.urlsafe_b64decode(raw.encode()))
    except (binascii.Error, ValueError):
        return []
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        return []
    level = data.get("level") if data.get("level") in FLASH_LEVELS else "info"
    return [{"level": level, "text": data["text"][:500]}]


# ---------------------------------------------------------------- rendering
def user_context(request: Request) -> dict[str, Any]:
    user: User | None = getattr(request.state, "page_user", None)
    return {
        "user": {"name": user.name, "role": user.role.value} if user is not None else None,
        "csrf_token": getattr(request.state, "csrf_token", "") or "",
    }


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200,
           headers: dict[str, str] | None = None, messages: list[dict[str, str]] | None = None) -> HTMLResponse:
    """A full page: ``context`` plus what base.html needs (user, CSRF token, flash messages)."""
    flashes = read_flash(request)
    full = {**user_context(request), "messages": flashes + (messages or []), **context}
    response = templates().TemplateResponse(request, name, full, status_code=status_code, headers=headers)
    if flashes:
        response.delete_cookie(FLASH_COOKIE, path="/", httponly=True, samesite="lax")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def render_fragment(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    """An htmx partial (``_name.html``): no layout, and flash messages stay for the next page."""
    full = {**user_context(request), **context}
    response = templates().TemplateResponse(request, name, full, status_code=status_code)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("Vary", "HX-Request")
    return response


def is_htmx(request: Request) -> bool:
    return request.headers.get("HX-Request") == "true"


def error_page(request: Request, status_code: int, message: str, detail: str = "",
               headers: dict[str, str] | None = None) -> HTMLResponse:
    context = {"status_code": status_code, "message": message, "detail": detail,
               "request_id": request.headers.get("X-Request-ID", "")[:64]}
    try:
        return render(request, "error.html", context, status_code=status_code, headers=headers)
    except Exception:  # noqa: BLE001 - the error page itself must never fail
        log.exception("rendering the error page failed")
        return HTMLResponse(f"<!doctype html><title>{status_code}</title><p>Error {status_code}.</p>",
                            status_code=status_code)


_LIBRARY_STATUS = ((DataError, 400),)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "The request is not valid."
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
    return f"The request is not valid: {where}: {first.get('msg', '')}" if where else "The request is not valid."


class PageRoute(APIRoute):
    """An APIRoute whose failures are HTML pages (or a sign-in redirect), never JSON or a traceback."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def page_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                return _login_redirect(request)
            except BodyTooLarge:
                raise  # the body-size middleware answers these
            except AppError as exc:
                return error_page(request, exc.status_code, exc.message, headers=exc.headers or None)
            except PCBMError as exc:
                status = next((s for kind, s in _LIBRARY_STATUS if isinstance(exc, kind)), 422)
                return error_page(request, status, str(exc))
            except RequestValidationError as exc:
                return error_page(request, 422, _validation_message(exc))
            except StarletteHTTPException as exc:
                message = exc.detail if isinstance(exc.detail, str) and exc.detail else "The request failed."
                return error_page(request, exc.status_code, message, headers=dict(exc.headers or {}) or None)
            except OverflowError:  # an id past the database's 64-bit integers names nothing
                return error_page(request, 422, "A number in the request is too large.")
            except (OperationalError, PoolTimeout) as exc:
                log.warning("database error on a page: %s", exc)
                return error_page(request, 503, "The database is busy or unavailable; try again in a moment.",
                                  headers={"Retry-After": "2"})
            except Exception:
                log.exception("unhandled error on page %s", request.url.path)
                return error_page(request, 500, "Something went wrong on our side. It has been logged.")

        return page_handler


# ---------------------------------------------------------------- who may see a page
def page_user(request: Request, user: OptionalUser) -> User:
    """The signed-in user (session cookie or bearer token); otherwise a redirect to sign in."""
    if user is None:
        raise LoginRequired()
    request.state.page_user = user
    return user


PageUser = Annotated[User, Depends(page_user)]


def is_staff(user: User) -> bool:
    return user.role in STAFF_ROLES


def staff_user(user: PageUser) -> User:
    """Researchers and admins: the people who inspect and edit models (as in the JSON API)."""
    if not is_staff(user):
        raise Forbidden("models are open to researchers and admins; participants reach them through a study")
    return user


StaffUser = Annotated[User, Depends(staff_user)]


# ---------------------------------------------------------------- models by name
def find_model(session: Session, name: str) -> Model:
    """The model called ``name`` in page URLs (a bare number also finds a model by id)."""
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None and name.isdigit() and len(name) < 12:
        model = session.get(Model, int(name))
    if model is None:
        raise NotFound(f"There is no model called “{name}”.")
    return model
