"""Migrations match the models exactly, round-trip, and gate the server's start (SQLite + PostgreSQL)."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import Column, Integer, MetaData, Table, insert
from sqlalchemy.exc import IntegrityError

from app.db import Base, make_engine, utcnow
from app.errors import SchemaNotAtHead
from app.main import create_app
from app.migrate import check_database, current_revision, downgrade, head_revision, upgrade

from .conftest import make_settings


def drift(engine, metadata=Base.metadata):
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, metadata)


@pytest.fixture
def engine(empty_db_url):
    engine = make_engine(empty_db_url)
    yield engine
    engine.dispose()


def test_upgrade_from_empty_matches_the_models(engine):
    assert current_revision(engine) is None
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert drift(engine) == []


def test_upgrade_downgrade_upgrade_round_trips(engine):
    upgrade(engine)
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert {op[0] for op in drift(engine)} == {"add_table", "add_index"}  # every table is gone again
    upgrade(engine)
    assert drift(engine) == []


def test_the_comparison_notices_drift(engine):
    """The check above can fail: a column the migrations lack is reported."""
    upgrade(engine)
    changed = MetaData()
    for table in Base.metadata.sorted_tables:
        copy = table.to_metadata(changed)
        if table.name == "users":
            copy.append_column(Column("nickname", Integer, nullable=True))
    assert any(op[0] == "add_column" and op[2] == "users" for op in drift(engine, changed))


def test_enum_columns_are_checked_by_the_database(engine):
    upgrade(engine)
    users = Table("users", MetaData(), autoload_with=engine)
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(insert(users).values(name="x", role="superuser", is_active=True, created_at=utcnow()))


def test_check_database_names_the_fix(engine):
    with pytest.raises(SchemaNotAtHead, match="pcbm db upgrade"):
        check_database(engine)
    upgrade(engine)
    check_database(engine)


def test_an_outdated_database_is_reported(engine):
    upgrade(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = 'from_the_future'")
    with pytest.raises(SchemaNotAtHead, match="does not know"):
        check_database(engine)


def test_the_server_refuses_to_start_on_an_unmigrated_database(tmp_path, empty_db_url):
    app = create_app(make_settings(tmp_path, database_url=empty_db_url))
    with pytest.raises(SchemaNotAtHead, match="pcbm db upgrade"), TestClient(app):
        pass


def test_alembic_autogenerate_sees_every_table(tmp_path):
    """``alembic check`` (autogenerate in a fresh process, as a developer runs it) proposes nothing
    against a migrated database: env.py's metadata holds every table, the studies' included."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PCBM_DATABASE_URL": f"sqlite:///{tmp_path / 'check.db'}", "PCBM_WORKSPACE": str(tmp_path)}
    alembic = [sys.executable, "-m", "alembic", "-c", str(root / "alembic.ini")]
    subprocess.run([*alembic, "upgrade", "head"], cwd=root, env=env, check=True, capture_output=True)
    done = subprocess.run([*alembic, "check"], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No new upgrade operations detected" in done.stdout + done.stderr
