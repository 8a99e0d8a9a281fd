"""The study event log: every participant action, stored with the server's time, never lost.

Actions that change state (joining, committing, undoing, submitting) write their event
with :func:`record` in a transaction of their own request. Everything else (page views,
concepts inspected, maps opened, previews) goes through :class:`StudyEventLog`: a bounded
in-process queue that a background thread drains in batches, so a page view costs the
request a ``queue.put`` and no database write. Nothing is dropped: when the queue is full
the caller waits briefly and then writes the event itself; a failed batch is retried;
:meth:`StudyEventLog.close` (called when the app shuts down) drains the queue first.
The time of an event is taken when it happens, not when it is stored.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.db import utcnow, write_transaction
from app.models_studies import StudyEvent

log = logging.getLogger(__name__)

EVENT_KINDS = (
    "join",  # redeemed an invitation and consented
    "page_view",  # opened a page of the study workspace
    "class_view",  # looked at the concept weights of a class
    "concept_inspect",  # opened one concept (its weight for every class)
    "map_open",  # opened example images / concept maps of a concept
    "suggestions_view",  # looked at suggested edits
    "preview",  # previewed pending prunes
    "edit_commit",  # committed prunes as a new version
    "edit_undo",  # undid the last version
    "action_refused",  # an action refused (over budget, time up, tool not given, ...), with the reason
    "submit",  # submitted the final model
)


@dataclass(frozen=True)
class Actor:
    """Who an event is about: the participant, their pseudonym and study."""

    study_id: int
    participant_id: int
    pseudonym: str


@dataclass
class _Event:
    actor: Actor
    kind: str
    model_version: int | None
    payload: dict[str, Any]
    created_at: datetime = field(default_factory=utcnow)

    def row(self) -> dict[str, Any]:
        return {"study_id": self.actor.study_id, "participant_id": self.actor.participant_id,
                "pseudonym": self.actor.pseudonym, "kind": self.kind, "model_version": self.model_version,
                "created_at": self.created_at, "payload": self.payload}


def _check_kind(kind: str) -> None:
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown study event kind {kind!r}")


def record(session: Session, actor: Actor, kind: str, model_version: int | None,
           payload: dict[str, Any] | None = None) -> StudyEvent:
    """Add an event to the caller's transaction (it is stored with the act, or not at all)."""
    _check_kind(kind)
    event = StudyEvent(study_id=actor.study_id, participant_id=actor.participant_id, pseudonym=actor.pseudonym,
                       kind=kind, model_version=model_version, payload=dict(payload or {}), created_at=utcnow())
    session.add(event)
    return event


class StudyEventLog:
    """A bounded queue of events, written in batches by one background thread.

    Parameters
    ----------
    session_factory : opens the sessions the writer thread uses.
    max_queue : events held in memory at most; beyond it :meth:`log` waits, then writes itself.
    batch_size : events written per transaction at most.
    put_wait_s : how long :meth:`log` waits for room before writing the event itself.
    """

    def __init__(self, session_factory: sessionmaker[Session], *, max_queue: int = 10_000, batch_size: int = 500,
                 put_wait_s: float = 0.5):
        self._factory = session_factory
        self._queue: queue.Queue[_Event | None] = queue.Queue(maxsize=max_queue)
        self._batch_size = batch_size
        self._put_wait_s = put_wait_s
        self._lock = threading.Lock()
        self._stored = threading.Condition(self._lock)
        self._accepted = 0  # events handed to log()
        self._written = 0  # of those, events stored
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- the caller's side ----------------------------------------------------------------------
    def log(self, actor: Actor, kind: str, model_version: int | None, payload: dict[str, Any] | None = None) -> None:
        """Queue one event; returns at once (or writes it itself when the queue stays full)."""
        _check_kind(kind)
        event = _Event(actor, kind, model_version, dict(payload or {}))
        with self._lock:
            self._accepted += 1
            closed = self._closed
            if not closed:
                self._start()
        if not closed:
            try:
                self._queue.put(event, timeout=self._put_wait_s)
                return
            except queue.Full:
                log.warning("study event queue is full: writing an event in the request")
        self._write_until_stored([event])

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every event logged before this call is stored; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            target = self._accepted
            while self._written < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._stored.wait(left)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Store everything queued, then stop the writer; later events are written directly."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)  # the writer drains what is ahead of this marker, then stops
            thread.join(timeout_s)
            if thread.is_alive():
                log.error("the study event writer did not finish within %.0f s", timeout_s)

    @property
    def pending(self) -> int:
        with self._lock:
            return self._accepted - self._written

    # -- the writer thread ----------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:  # called with the lock held
            self._thread = threading.Thread(target=self._run, name="pcbm-study-events", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            batch: list[_Event] = []
            if first is None:
                stopping = True
            else:
                batch.append(first)
            while len(batch) < self._batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    batch.append(item)
            if batch:
                self._write_until_stored(batch)

    def _write_until_stored(self, events: list[_Event]) -> None:
        """Insert ``events`` in one transaction, retrying while the database is unavailable.

        An event the database refuses for good (an integrity error, say) cannot be fixed by
        retrying: the batch is then written one event at a time, and only the refused one
        is given up, with an error in the log naming it.
        """
        delay, attempt = 0.05, 0
        while True:
            attempt += 1
            try:
                self._insert(events)
                break
            except (OperationalError, InterfaceError) as exc:  # locked, busy, connection lost: wait
                if attempt == 1 or attempt % 20 == 0:
                    log.warning("storing %d study event(s) failed (attempt %d), retrying: %s", len(events),
                                attempt, str(getattr(exc, "orig", None) or exc).splitlines()[0])
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except SQLAlchemyError as exc:
                if len(events) > 1:
                    for event in events:
                        self._write_until_stored([event])
                    return
                log.error("a study event was refused by the database and is not stored: %s (%s)",
                          events[0].row(), str(getattr(exc, "orig", None) or exc).splitlines()[0])
                break
        with self._lock:
            self._written += len(events)
            self._stored.notify_all()

    def _insert(self, events: list[_Event]) -> None:
        session = self._factory()
        try:
            with write_transaction(session):
                session.execute(insert(StudyEvent), [e.row() for e in events])
        finally:
            session.close()


_attach_lock = threading.Lock()


def attached_log(holder: Any, session_factory: sessionmaker[Session]) -> StudyEventLog:
    """The event log kept on ``holder`` (the web app's state), made on first use."""
    found = getattr(holder, "study_events", None)
    if found is None:
        with _attach_lock:
            found = getattr(holder, "study_events", None)
            if found is None:
                found = StudyEventLog(session_factory)
                holder.study_events = found
    return found
