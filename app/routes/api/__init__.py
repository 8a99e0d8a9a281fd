"""The versioned JSON API, mounted at ``/api/v1``."""

from fastapi import APIRouter

from app.routes.api import auth, build, inspect, jobs, maps, models, studies, suggestions, tokens, users
from app.schemas import ErrorBody

# Any API route can answer these: a malformed body (400), no or a bad login (401), a role
# or CSRF refusal (403), an unknown id (404), a body over the size limit (413) and a busy
# database (503, see app.error_handlers).
_errors = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 503)}

api_router = APIRouter(responses=_errors)
api_router.include_router(auth.router)
api_router.include_router(users.router)
api_router.include_router(tokens.router)
api_router.include_router(jobs.router)
api_router.include_router(build.router)
api_router.include_router(models.router)
api_router.include_router(inspect.router)
api_router.include_router(maps.router)
api_router.include_router(suggestions.router)
api_router.include_router(studies.router)
