"""The versioned JSON API, mounted at ``/api/v1``."""

from fastapi import APIRouter

from app.routes.api import auth, inspect, jobs, models, tokens, users
from app.schemas import ErrorBody

_errors = {status: {"model": ErrorBody} for status in (401, 403, 404)}

api_router = APIRouter(responses=_errors)
api_router.include_router(auth.router)
api_router.include_router(users.router)
api_router.include_router(tokens.router)
api_router.include_router(jobs.router)
api_router.include_router(models.router)
api_router.include_router(inspect.router)
