"""Alembic environment: migrates the app's metadata on the engine the caller hands over.

``app.migrate`` passes its engine in ``config.attributes["engine"]``; the ``alembic``
command line (``alembic.ini`` at the repository root) falls back to the URL in the
config or to the ``PCBM_*`` settings.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from app import models, models_studies  # noqa: F401  (every module of tables registers them on the metadata)
from app.db import Base, make_engine

config = context.config
if config.config_file_name is not None and config.attributes.get("engine") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)
target_metadata = Base.metadata


def _engine():
    engine = config.attributes.get("engine")
    if engine is not None:
        return engine
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from app.settings import Settings

        url = Settings().database_url
    return make_engine(url)


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = _engine()
    with engine.connect() as connection:
        is_sqlite = connection.dialect.name == "sqlite"
        if is_sqlite:
            # Table rebuilds (batch mode) drop and rename tables; SQLite wants foreign keys
            # off meanwhile, and the pragma only works outside a transaction.
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=is_sqlite,
                compare_type=True,
                # SQLite runs DDL inside transactions once the driver stops managing them
                # (app.db does that), so a failed migration leaves nothing half-applied.
                transactional_ddl=True,
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if is_sqlite:
                connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
