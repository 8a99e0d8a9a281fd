"""``create_app(settings)``: the web application, built from its settings (no globals).

    uvicorn --factory app.main:create_app     # settings from PCBM_* environment variables
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

import ml
from app.context import AppContext, build_context
from app.error_handlers import install_error_handlers
from app.errors import SchemaNotAtHead
from app.middleware import BodySizeLimitMiddleware, SecurityHeadersMiddleware
from app.migrate import check_database
from app.resources import STATIC_DIR
from app.routes import health, pages, session
from app.routes.api import api_router
from app.schemas import ErrorBody
from app.services.head_editing import HeadEditor
from app.services.runner import JobHandler
from app.services.workspace_import import import_and_load, needs_loading
from app.settings import Settings

log = logging.getLogger(__name__)

ModelLoader = Callable[[AppContext], None]
API_PREFIX = "/api/v1"


def _load_models(ctx: AppContext, loader: ModelLoader | None) -> None:
    if loader is None:  # nothing to warm up: ready as soon as the database is
        ctx.readiness.set_models_loaded(True)
        return
    try:
        loader(ctx)
    except Exception as exc:  # readiness reports it; the process stays up for /healthz
        log.exception("loading models failed")
        ctx.readiness.set_models_loaded(False, error=str(exc) or type(exc).__name__)
    else:
        ctx.readiness.set_models_loaded(True)


def create_app(
    settings: Settings | None = None,
    *,
    head_editor: HeadEditor | None = None,
    model_loader: ModelLoader | None = None,
    job_handlers: Mapping[str, JobHandler] | None = None,
    check_schema: bool = True,
) -> FastAPI:
    """Build the app.

    Parameters
    ----------
    settings
        Defaults to ``Settings()`` (the ``PCBM_*`` environment).
    head_editor
        Turns edits into new head weights; defaults to the model service's ``ml.editing`` editor.
    model_loader
        Runs in a background thread at startup (loads backbones, heads, cached scores);
        ``/readyz`` answers 503 until it returns. Default: import the served workspace (if it
        has a ``workspace.json``) and load every imported model into ``ctx.models``.
    job_handlers
        Job kinds this process can run, ``{kind: handler}``; default: ``build_jobs.handlers``.
    check_schema
        Refuse to start when the database schema is not at the migration head.
    """
    settings = settings or Settings()
    ctx = build_context(settings, head_editor=head_editor)
    if job_handlers is None:  # embed a dataset, build a concept bank, train a model
        from app.services.build_jobs import handlers

        job_handlers = handlers(ctx)
    for kind, handler in job_handlers.items():
        ctx.runner.register(kind, handler)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if check_schema:
            try:
                check_database(ctx.engine)
            except SchemaNotAtHead:
                ctx.engine.dispose()
                raise  # refuse to start: the message names the fix (`pcbm db upgrade`)
            except Exception as exc:  # noqa: BLE001 - unreachable: start anyway, /readyz says 503 until it is back
                log.warning("%s", exc)
        if settings.run_jobs:
            ctx.runner.start()
        loader = model_loader
        if loader is None and needs_loading(ctx):
            loader = import_and_load  # the default: import the served workspace, load its models
        threading.Thread(target=_load_models, args=(ctx, loader), name="pcbm-model-loader", daemon=True).start()
        try:
            yield
        finally:
            ctx.close()

    app = FastAPI(
        title="PCBM Studio",
        summary="Post-hoc concept bottleneck models: inspect, edit and version interpretable image classifiers.",
        version=ml.__version__,
        lifespan=lifespan,
        docs_url=None,  # served below from vendored files, so /docs works offline
        redoc_url=None,
        responses={422: {"model": ErrorBody, "description": "Invalid request"}},
    )
    app.state.ctx = ctx
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(session.router)
    app.include_router(api_router, prefix=API_PREFIX)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="PCBM Studio API",
            swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url="/static/vendor/swagger-ui/favicon.png",
        )

    return app
