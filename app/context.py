"""Everything one running app holds: settings, database, artifact store, workers, limits.

Built by :func:`build_context` from a :class:`Settings`; ``create_app`` keeps it on
``app.state.ctx``. Tests build as many as they like; nothing here is module-global.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_session_factory
from app.security import LoginRateLimiter, SessionSigner
from app.services.artifacts import ArtifactStore
from app.services.head_editing import HeadEditor
from app.services.limits import ConcurrencyLimit
from app.services.model_service import ModelService
from app.services.runner import JobRunner
from app.settings import Settings, load_secret_key


@dataclass
class Readiness:
    """Flags behind ``/readyz``. The model service sets ``models_loaded`` once its caches are warm."""

    models_loaded: bool = False
    models_error: str | None = None
    schema_at_head: bool = False  # cached once true: a running server's schema does not move back
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set_models_loaded(self, loaded: bool = True, error: str | None = None) -> None:
        with self._lock:
            self.models_loaded, self.models_error = loaded, error


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    artifacts: ArtifactStore
    signer: SessionSigner
    login_limiter: LoginRateLimiter
    runner: JobRunner
    head_editor: HeadEditor
    preview_limit: ConcurrencyLimit
    inference_limit: ConcurrencyLimit
    readiness: Readiness = field(default_factory=Readiness)
    # Loaded models and backbones, with cached evaluation splits (None: serve no models).
    models: ModelService | None = None

    def close(self) -> None:
        self.runner.stop()
        self.engine.dispose()


def open_database(settings: Settings) -> tuple[Engine, sessionmaker[Session]]:
    engine = make_engine(settings.database_url, sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    return engine, make_session_factory(engine)


def build_context(settings: Settings, *, head_editor: HeadEditor | None = None) -> AppContext:
    engine, factory = open_database(settings)
    artifacts = ArtifactStore(settings.artifacts_root)
    preview_limit = ConcurrencyLimit("preview", settings.preview_concurrency, settings.overload_wait_s)
    inference_limit = ConcurrencyLimit("inference", settings.inference_concurrency, settings.overload_wait_s)
    models = ModelService(settings, factory, artifacts, preview_limit=preview_limit, inference_limit=inference_limit)
    return AppContext(
        settings=settings,
        engine=engine,
        session_factory=factory,
        artifacts=artifacts,
        signer=SessionSigner(load_secret_key(settings), settings.session_max_age_s),
        login_limiter=LoginRateLimiter(settings.login_rate_limit, settings.login_rate_window_s),
        runner=JobRunner(factory),
        # ml.editing on the model service's concept banks (the tensor editor for models without one)
        head_editor=head_editor or models.head_editor(),
        preview_limit=preview_limit,
        inference_limit=inference_limit,
        models=models,
    )
