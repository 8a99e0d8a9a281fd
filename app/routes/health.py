"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from app.deps import ContextDep
from app.errors import DatabaseNotReady, SchemaNotAtHead, Unavailable
from app.migrate import check_database
from app.schemas import ErrorBody, HealthPublic, ReadyPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthPublic)
async def healthz() -> HealthPublic:
    """200 while the process lives; touches nothing else (async: no worker thread needed)."""
    return HealthPublic()


@router.get("/readyz", response_model=ReadyPublic, responses={503: {"model": ErrorBody}})
def readyz(ctx: ContextDep) -> ReadyPublic:
    """200 once the database answers, its schema is at head and the models are loaded."""
    checks = {"database": False, "migrations": False, "models": ctx.readiness.models_loaded}
    reasons = []
    try:
        if ctx.readiness.schema_at_head:
            with ctx.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        else:
            check_database(ctx.engine)
            ctx.readiness.schema_at_head = True
        checks["database"] = checks["migrations"] = True
    except SchemaNotAtHead as exc:
        checks["database"] = True
        reasons.append(exc.message)
    except DatabaseNotReady as exc:
        reasons.append(exc.message)
    except Exception as exc:  # noqa: BLE001 - a ping can fail in many driver-specific ways
        reasons.append(f"database check failed: {type(exc).__name__}")
    if not checks["models"]:
        reasons.append(ctx.readiness.models_error or "models are still loading")
    if all(checks.values()):
        return ReadyPublic(checks=checks)
    raise Unavailable("not ready: " + "; ".join(reasons), detail={"checks": checks}, headers={"Retry-After": "2"})
