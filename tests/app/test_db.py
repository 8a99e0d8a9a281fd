"""Database plumbing: SQLite pragmas, write transactions, timestamps."""

import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import select, text

from app.db import make_engine, make_session_factory, write_transaction
from app.models import AuditEvent, User
from app.services import audit, users


def test_sqlite_runs_in_wal_mode_with_foreign_keys_and_a_busy_timeout(ctx):
    with ctx.engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar() == ctx.settings.sqlite_busy_timeout_ms


def test_foreign_keys_are_enforced(db):
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError), write_transaction(db):
        audit.record(db, "x", user=None, object_type="t", object_id=1)
        db.add(AuditEvent(action="y", user_id=4242, object_type="t", object_id="1", payload={}))
        db.flush()


def test_read_then_write_transactions_wait_for_each_other_instead_of_failing(ctx, make_user):
    """Each writer reads, pauses, then writes: SQLite would fail the second with 'database is
    locked' if its transaction started deferred; BEGIN IMMEDIATE makes it wait its turn."""
    user = make_user()
    errors, done = [], []

    def rename(suffix):
        session = ctx.session_factory()
        try:
            with write_transaction(session):
                current = session.scalar(select(User.name).where(User.id == user.id))
                time.sleep(0.2)
                session.get(User, user.id).name = current + suffix
            done.append(suffix)
        except Exception as exc:  # noqa: BLE001 - the test reports whatever went wrong
            errors.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=rename, args=(s,)) for s in ("-a", "-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert errors == [] and sorted(done) == ["-a", "-b"]
    with ctx.session_factory() as session:
        assert session.get(User, user.id).name in (f"{user.name}-a-b", f"{user.name}-b-a")  # no lost update


def test_write_transactions_do_not_nest(db):
    with write_transaction(db), pytest.raises(RuntimeError, match="nested"), write_transaction(db):
        pass


def test_a_failed_block_rolls_back(db):
    with pytest.raises(ValueError), write_transaction(db):
        audit.record(db, "x", user=None, object_type="t", object_id=1)
        raise ValueError("boom")
    assert audit.list_events(db, object_type="t") == []


def test_timestamps_come_back_timezone_aware(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    from app.db import Base

    Base.metadata.create_all(engine)
    factory = make_session_factory(engine)
    with factory() as session:
        user = users.create_user(session, "tz", "admin")
        session.expire_all()
        created = session.get(User, user.id).created_at
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - created).total_seconds()) < 60
    engine.dispose()
