"""An in-process job runner: one worker thread that runs queued jobs of registered kinds.

On start it re-queues jobs a previous process left ``running``; handlers are written to
resume (the embedding cache keeps finished shards, for instance), so a restart costs at
most the work since the last checkpoint. On a clean stop a running job is handed back to
the queue at its next progress report.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db import session_scope
from app.errors import AppError
from app.services import jobs
from ml.errors import PCBMError

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised inside a handler (by :meth:`JobContext.progress`) when a cancel was requested."""


class WorkerStopping(Exception):
    """Raised inside a handler when the runner shuts down; the job goes back to the queue."""


@dataclass
class JobContext:
    """What a handler gets: the job's parameters and a way to report progress."""

    job_id: int
    kind: str
    params: dict[str, Any]
    attempt: int  # 1 on the first run, higher when resumed after a restart
    created_by: int | None = field(default=None, kw_only=True)  # the user who asked for it
    _report: Callable[[float, str | None], bool] = field(repr=False)
    _stopping: threading.Event = field(repr=False)
    _min_interval_s: float = field(default=0.5, repr=False)
    _last: float = field(default=0.0, repr=False)

    def progress(self, fraction: float, stage: str | None = None, *, force: bool = False) -> None:
        """Report progress (0..1); raises :class:`JobCancelled` or :class:`WorkerStopping` to end the job."""
        if self._stopping.is_set():
            raise WorkerStopping()
        now = time.monotonic()
        if not force and stage is None and now - self._last < self._min_interval_s:
            return  # at most a couple of writes a second, however often a loop reports
        self._last = now
        if self._report(fraction, stage):
            raise JobCancelled()


JobHandler = Callable[[JobContext], "dict[str, Any] | None"]


class JobRunner:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        poll_interval_s: float = 1.0,
        max_attempts: int = 3,
        progress_interval_s: float = 0.5,
    ):
        self._factory = session_factory
        self._handlers: dict[str, JobHandler] = {}
        self._poll_interval_s = poll_interval_s
        self._max_attempts = max_attempts
        self._progress_interval_s = progress_interval_s
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self, kind: str, handler: JobHandler) -> None:
        self._handlers[kind] = handler

    @property
    def kinds(self) -> list[str]:
        return sorted(self._handlers)

    def wake(self) -> None:
        """Look for work now instead of at the next poll (call after creating a job)."""
        self._wake.set()

    def start(self) -> None:
        """Start the worker thread; it first re-queues what a previous process left running."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="pcbm-jobs", daemon=True)
        self._thread.start()

    def _requeue_interrupted(self) -> None:
        with session_scope(self._factory) as session:
            requeued, failed = jobs.requeue_interrupted(session, max_attempts=self._max_attempts)
        if requeued or failed:
            log.info("jobs after restart: re-queued %s, failed %s", requeued, failed)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _loop(self) -> None:
        recovered = False
        while not self._stopping.is_set():
            ran = None
            try:
                if not recovered:  # retried until the database answers
                    self._requeue_interrupted()
                    recovered = True
                ran = self.run_once()
            except Exception:  # the database may be briefly unavailable; keep the worker alive
                log.exception("job runner: cannot reach the job queue")
            if ran is None:
                self._wake.wait(self._poll_interval_s)
                self._wake.clear()

    def run_once(self) -> int | None:
        """Claim one queued job and run it to the end; returns its id, or ``None`` when idle."""
        if not self._handlers:
            return None
        with session_scope(self._factory) as session:
            job = jobs.claim_next(session, self.kinds)
            if job is None:
                return None
            job_id, kind, params, attempt, owner = job.id, job.kind, dict(job.params), job.attempts, job.created_by_id

        def report(fraction: float, stage: str | None) -> bool:
            with session_scope(self._factory) as progress_session:
                return jobs.report_progress(progress_session, job_id, fraction, stage)

        context = JobContext(job_id=job_id, kind=kind, params=params, attempt=attempt, created_by=owner, _report=report,
                             _stopping=self._stopping, _min_interval_s=self._progress_interval_s)
        finish: Callable[[Session], bool]
        try:
            result = self._handlers[kind](context)
            finish = functools.partial(jobs.mark_done, job_id=job_id, result=result)
        except JobCancelled:
            finish = functools.partial(jobs.mark_cancelled, job_id=job_id)
        except WorkerStopping:
            finish = functools.partial(jobs.release, job_id=job_id, stage="waiting to resume")
        except (PCBMError, AppError) as exc:
            finish = functools.partial(jobs.mark_failed, job_id=job_id, reason=str(exc))
        except Exception as exc:  # a bug in a handler must not kill the worker or leak a traceback
            log.exception("job %s (%s) crashed", job_id, kind)
            finish = functools.partial(jobs.mark_failed, job_id=job_id,
                                       reason=f"internal error ({type(exc).__name__}): {exc}")
        with session_scope(self._factory) as session:
            try:
                finish(session)
            except AppError as exc:  # e.g. a result that is not plain JSON
                jobs.mark_failed(session, job_id, str(exc))
        return job_id
