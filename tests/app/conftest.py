"""Fixtures for the app: a fresh workspace and a real database migrated to head, per test.

SQLite databases are copied from one migrated template (fast); PostgreSQL databases are
created per test as ``pcbm_test_<random>`` and dropped afterwards. When the PostgreSQL
server is unreachable those tests are skipped with the reason shown.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.db import make_engine
from app.main import create_app
from app.migrate import upgrade
from app.models import Role, User
from app.services import users as user_service
from app.settings import Settings

TEST_SECRET = "test-secret-key-" + "k" * 32
PG_DSN = os.environ.get("TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres")
PG_URL_BASE = os.environ.get("TEST_PG_URL_BASE", "postgresql+psycopg://postgres@127.0.0.1:5432")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test, never from the developer's PCBM_* environment."""
    for name in list(os.environ):
        if name.startswith("PCBM_"):
            monkeypatch.delenv(name)


def make_settings(workspace: Path, **overrides) -> Settings:
    values = {"workspace": workspace, "secret_key": TEST_SECRET, "run_jobs": False} | overrides
    return Settings(**values)


# -- SQLite ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "pcbm.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    engine.dispose()
    return path


@pytest.fixture
def workspace(tmp_path: Path, sqlite_template: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copy(sqlite_template, ws / "pcbm.db")
    return ws


# -- PostgreSQL --------------------------------------------------------------------------------

def _pg_admin():
    import psycopg

    return psycopg.connect(f"{PG_DSN} dbname=postgres connect_timeout=3", autocommit=True)


@pytest.fixture(scope="session")
def pg_server() -> None:
    try:
        with _pg_admin() as connection:
            connection.execute("SELECT 1")
    except Exception as exc:  # noqa: BLE001 - any failure means "no server for these tests"
        pytest.skip(f"PostgreSQL is not reachable ({PG_DSN}): {str(exc).strip().splitlines()[0]}")


def _create_pg_database() -> str:
    from psycopg import sql

    name = f"pcbm_test_{secrets.token_hex(6)}"
    with _pg_admin() as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        # Test data need not survive a power cut; skipping the commit fsync keeps tests fast.
        connection.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(sql.Identifier(name)))
    return name


def _drop_pg_database(name: str) -> None:
    from psycopg import sql

    with _pg_admin() as connection:
        connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def pg_shared(pg_server: None) -> Iterator[str]:
    """One PostgreSQL database migrated once per session; tests empty it rather than recreate it."""
    name = _create_pg_database()
    engine = make_engine(f"{PG_URL_BASE}/{name}")
    upgrade(engine)
    engine.dispose()
    yield f"{PG_URL_BASE}/{name}"
    _drop_pg_database(name)


@pytest.fixture
def pg_empty_url(pg_server: None) -> Iterator[str]:
    """An empty PostgreSQL database, dropped after the test."""
    name = _create_pg_database()
    yield f"{PG_URL_BASE}/{name}"
    _drop_pg_database(name)


@pytest.fixture
def pg_url(pg_shared: str) -> str:
    """A PostgreSQL database migrated to head with every table empty (ids restart at 1)."""
    from app.db import Base

    engine = make_engine(pg_shared)
    with engine.begin() as connection:
        # DELETE beats TRUNCATE on tiny tables (TRUNCATE rewrites every file); the head
        # pointer is cleared first because models and model_versions reference each other.
        connection.exec_driver_sql("UPDATE models SET head_version_id = NULL")
        for table in reversed(Base.metadata.sorted_tables):
            connection.exec_driver_sql(f'DELETE FROM "{table.name}"')
            connection.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table.name}', 'id'), 1, false)")
    engine.dispose()
    return pg_shared


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def empty_db_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """An empty database of each kind (SQLite, PostgreSQL)."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("pg_empty_url")


@pytest.fixture
def any_settings(backend: str, workspace: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for a migrated database of each kind (SQLite, PostgreSQL)."""
    if backend == "sqlite":
        return make_settings(workspace)
    return make_settings(workspace, database_url=request.getfixturevalue("pg_url"))


# -- apps, sessions, users -------------------------------------------------------------------

@pytest.fixture
def settings(workspace: Path) -> Settings:
    return make_settings(workspace)


@pytest.fixture
def app(settings: Settings):
    return create_app(settings)


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def ctx(app):
    return app.state.ctx


@pytest.fixture
def db(ctx) -> Iterator[Session]:
    session = ctx.session_factory()
    yield session
    session.close()


UserFactory = Callable[..., User]


@pytest.fixture
def make_user(db: Session) -> UserFactory:
    counter = iter(range(1, 10_000))

    def make(role: Role | str = Role.RESEARCHER, name: str | None = None, password: str | None = None) -> User:
        role = Role(role)
        return user_service.create_user(db, name or f"{role.value}{next(counter)}", role, password)

    return make


@pytest.fixture
def token_headers(db: Session) -> Callable[[User], dict[str, str]]:
    def headers(user: User) -> dict[str, str]:
        _, plain = user_service.create_token(db, user, "test")
        return {"Authorization": f"Bearer {plain}"}

    return headers


@pytest.fixture
def as_role(make_user: UserFactory, token_headers) -> Callable[[str], dict[str, str]]:
    """Bearer headers of a new user with the given role (``"anonymous"``: no headers)."""

    def headers(role: str) -> dict[str, str]:
        if role == "anonymous":
            return {}
        return token_headers(make_user(role))

    return headers
