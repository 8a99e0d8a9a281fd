"""Schema migrations (Alembic), configured in code so they work from an installed package.

``pcbm db upgrade`` calls :func:`upgrade`; the server calls :func:`check_database` and
refuses to start on a database whose schema is not at this code's head revision.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.errors import DatabaseNotReady, SchemaNotAtHead
from app.resources import MIGRATIONS_DIR


def alembic_config(engine: Engine) -> Config:
    """An Alembic config whose ``env.py`` runs on ``engine`` (so SQLite keeps its pragmas)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    assert head is not None, "the migrations folder has no revisions"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at; ``None`` for an empty (unmigrated) database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str) -> None:
    command.downgrade(alembic_config(engine), revision)


def _display_url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def check_database(engine: Engine) -> None:
    """Raise :class:`DatabaseNotReady`, naming the fix, unless the schema is at head."""
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseNotReady(f"cannot reach the database at {_display_url(engine)}: {reason}") from None
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaNotAtHead(
            f"the database at {_display_url(engine)} is not initialised; run `pcbm db upgrade` first"
        )
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    known = {rev.revision for rev in script.walk_revisions()}
    if current not in known:
        raise SchemaNotAtHead(
            f"the database at {_display_url(engine)} is at revision {current}, which this version of "
            "PCBM Studio does not know (is the database newer than the code?)"
        )
    raise SchemaNotAtHead(
        f"the database at {_display_url(engine)} is at revision {current}, not {head}; run `pcbm db upgrade`"
    )
