"""The web app's settings, read from ``PCBM_*`` environment variables.

Every field is declared once here with a default and a help text; ``docs/settings.md``
documents them all in one table and a test fails when a field is missing there.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

SECRET_KEY_FILE = "secret_key"
MIN_SECRET_KEY_LENGTH = 32


class SettingsError(Exception):
    """The settings cannot be used as given; the message says which and what to do."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PCBM_", extra="ignore", frozen=False)

    workspace: Path = Field(
        default=Path("workspace"),
        description="Workspace directory the app serves (datasets, banks, models, database, artifacts).",
    )
    data_root: Path | None = Field(
        default=None,
        description="Directory under which the web app and API may register datasets and concept-example folders "
        "(paths are given relative to it and cannot leave it); default: the workspace.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy database URL; empty means SQLite at `<workspace>/pcbm.db`. "
        "PostgreSQL: `postgresql+psycopg://user:pass@host/db`.",
    )
    artifact_dir: Path | None = Field(
        default=None,
        description="Content-addressed artifact store (head weights per version); default `<workspace>/artifacts`.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Where models run: `auto` picks `cuda` when available, else `cpu`."
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Key that signs session cookies and CSRF tokens (at least 32 characters). If unset, one is "
        "generated once into `<workspace>/secret_key` (mode 0600). Required when `production` is true.",
    )
    production: bool = Field(
        default=False,
        description="Production mode: refuse to start without `PCBM_SECRET_KEY`.",
    )
    max_upload_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0,
        description="Largest request body accepted, in bytes (chunked bodies included); larger ones get 413.",
    )
    max_image_pixels: int = Field(
        default=40_000_000, gt=0,
        description="Largest decoded image (width x height) accepted; larger images are refused as bombs.",
    )
    model_memory_budget_mb: int = Field(
        default=4096, gt=0,
        description="Memory the model service may use for loaded backbones, heads and cached concept scores (MiB).",
    )
    preview_concurrency: int = Field(
        default=4, gt=0, description="Edit previews computed at once; further requests wait briefly, then get 503."
    )
    inference_concurrency: int = Field(
        default=2, gt=0, description="Image inferences (embedding, concept maps) at once; further requests wait briefly, then get 503."
    )
    overload_wait_s: float = Field(
        default=2.0, ge=0, description="How long a request waits for a free preview/inference slot before 503."
    )
    predict_batch_window_ms: float = Field(
        default=5.0, ge=0, le=1000,
        description="How long an image upload waits for others to share its backbone pass (micro-batching), in ms.",
    )
    predict_max_batch: int = Field(
        default=32, gt=0, le=1024,
        description="Uploads embedded in one backbone pass at most; 1 turns micro-batching off.",
    )
    predict_max_pending: int = Field(
        default=256, gt=0,
        description="Uploads queued for the backbone at most; further ones get 503 with `Retry-After` at once.",
    )
    login_rate_limit: int = Field(
        default=5, gt=0, description="Failed logins allowed per user name and client IP within `login_rate_window_s`; then 429."
    )
    login_rate_window_s: int = Field(
        default=300, gt=0, description="Window of the login rate limit, in seconds."
    )
    login_link_ttl_s: int = Field(
        default=900, gt=0, description="Lifetime of a one-time login link (as printed by `pcbm demo`), in seconds."
    )
    session_cookie_name: str = Field(
        default="pcbm_session", pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="Name of the browser session cookie."
    )
    session_max_age_s: int = Field(
        default=14 * 24 * 3600, gt=0, description="Lifetime of a browser session, in seconds."
    )
    session_cookie_secure: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="`Secure` flag of the session cookie: `auto` sets it when the request came over https "
        "(behind a proxy, run uvicorn with `--proxy-headers`).",
    )
    run_jobs: bool = Field(
        default=True,
        description="Run queued jobs in this process. Exactly one process per database should do so.",
    )
    sqlite_busy_timeout_ms: int = Field(
        default=15_000, ge=0, description="How long a SQLite writer waits for the lock before failing, in ms."
    )

    @model_validator(mode="after")
    def _resolve(self) -> Settings:
        self.workspace = Path(self.workspace).expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.workspace / 'pcbm.db'}"
        if self.artifact_dir is None:
            self.artifact_dir = self.workspace / "artifacts"
        else:
            self.artifact_dir = Path(self.artifact_dir).expanduser().resolve()
        if self.secret_key is not None and len(self.secret_key.get_secret_value()) < MIN_SECRET_KEY_LENGTH:
            raise ValueError(f"PCBM_SECRET_KEY must be at least {MIN_SECRET_KEY_LENGTH} characters long")
        if self.production and self.secret_key is None:
            raise ValueError(
                "production mode needs PCBM_SECRET_KEY (generate one with: "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        return self

    @property
    def data_root_path(self) -> Path:
        return Path(self.data_root).expanduser().resolve() if self.data_root is not None else self.workspace

    @property
    def artifacts_root(self) -> Path:
        assert self.artifact_dir is not None  # filled by the validator
        return self.artifact_dir

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def load_secret_key(settings: Settings) -> str:
    """The signing key: from the settings, else from ``<workspace>/secret_key``, created once.

    The file is created with mode 0600 and published with a hard link, so two processes
    starting at once end up with the same key and nobody ever reads a half-written file.
    """
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    if settings.production:  # the validator already refuses this; kept for settings built by model_construct
        raise SettingsError("production mode needs PCBM_SECRET_KEY")
    path = settings.workspace / SECRET_KEY_FILE
    if not path.exists():
        settings.workspace.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=settings.workspace, prefix=".secret_key.")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, secrets.token_urlsafe(48).encode())
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race; use its key
        finally:
            Path(tmp).unlink(missing_ok=True)
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as exc:
        raise SettingsError(f"cannot read the secret key file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; run: chmod 600 %s", path, path)
    if len(key) < MIN_SECRET_KEY_LENGTH:
        raise SettingsError(f"the secret key in {path} is too short; delete the file to generate a new one")
    return key
