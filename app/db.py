"""Database plumbing: declarative base, engines, session factories, write transactions.

No module-level engine or session: :func:`make_engine` and :func:`make_session_factory`
are called by whoever builds the app (or the CLI, or a test) from its settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event, make_url
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations can refer to (and SQLite batch mode can rebuild) them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Execution option that asks for a write transaction (BEGIN IMMEDIATE on SQLite).
WRITE_OPTION = "pcbm_write"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use a timezone-aware UTC time")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# A request holds its session's connection from its first query to its end, and the server
# runs up to 40 sync handlers at once (anyio's default thread limit) besides the job runner
# and the model loader. SQLAlchemy's default pool (5 + 10 overflow) made the 16th concurrent
# request wait 30 s and fail with a 500 (found by bench/load.py); now the pool covers every
# worker, and a request that still cannot get a connection waits 10 s, then gets 503.
POOL_OPTIONS = {"pool_size": 40, "max_overflow": 20, "pool_timeout": 10}


def make_engine(database_url: str, *, sqlite_busy_timeout_ms: int = 15_000, echo: bool = False) -> Engine:
    """An engine for ``database_url``; SQLite gets WAL, a busy timeout, foreign keys and real transactions."""
    if database_url.startswith("sqlite"):
        database = make_url(database_url).database
        in_memory = not database or database == ":memory:"
        if not in_memory:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            database_url,
            echo=echo,
            connect_args={"check_same_thread": False, "timeout": sqlite_busy_timeout_ms / 1000},
            **({} if in_memory else POOL_OPTIONS),
        )
        _configure_sqlite(engine, sqlite_busy_timeout_ms)
        return engine
    return create_engine(database_url, echo=echo, pool_pre_ping=True, **POOL_OPTIONS)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module, which would otherwise run
        # SELECTs outside any transaction; SQLAlchemy's "begin" event emits BEGIN instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A deferred transaction that read first and writes later cannot wait for the lock:
        # SQLite fails it at once with "database is locked". Writers therefore take the
        # lock up front (BEGIN IMMEDIATE), where the busy timeout applies.
        if connection.get_execution_options().get(WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: handlers build responses from them afterwards.
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=True)


@contextmanager
def write_transaction(session: Session) -> Iterator[Session]:
    """Run the block as one write transaction: commit on success, roll back on any error.

    A read transaction the session may hold (from authentication, say) is ended first,
    so that on SQLite the write starts with the lock already taken.
    """
    if session.info.get(WRITE_OPTION):
        # An inner block would commit the outer one's half-done work: compose services instead.
        raise RuntimeError("write_transaction blocks cannot be nested")
    if session.in_transaction():
        session.commit()
    session.connection(execution_options={WRITE_OPTION: True})
    session.info[WRITE_OPTION] = True
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.info.pop(WRITE_OPTION, None)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session for background work (jobs, CLI); always closed, rolled back if left open."""
    session = factory()
    try:
        yield session
    finally:
        session.close()
