"""The server-rendered pages (Jinja2 + htmx). Every page has a JSON twin under ``/api/v1``.

Paths come from ``app.templating.PAGE_ROUTES``, the table the templates build links with.
Every route here is a :class:`~app.routes.pages.common.PageRoute`: failures render
``error.html`` with the right status, and a missing sign-in redirects to the login page.
"""

from fastapi import APIRouter

from app.routes.pages import (
    auth,
    bank,
    build,
    edits,
    history,
    home,
    images,
    jobs,
    model,
    participate,
    studies,
    suggestions,
    upload,
)
from app.routes.pages.common import PageRoute

router = APIRouter(route_class=PageRoute, include_in_schema=False)
for module in (auth, home, model, edits, history, images, upload, bank, build, jobs, suggestions, studies, participate):
    router.include_router(module.router)

__all__ = ["router"]
