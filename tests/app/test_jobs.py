"""Jobs: the state machine, the in-process runner, restarts, and the /api/v1/jobs endpoints."""

import threading

import pytest

from app.models import Job, JobStatus, Role
from app.services import jobs
from app.services.runner import JobRunner
from ml.errors import DataError


@pytest.fixture
def runner(ctx):
    runner = JobRunner(ctx.session_factory, poll_interval_s=0.05, progress_interval_s=0.0)
    yield runner
    runner.stop()


def reload(db, job_id):
    db.rollback()  # end the read snapshot, so the next read sees other sessions' commits ...
    db.expire_all()  # ... and forget loaded values (a rollback outside a transaction keeps them)
    return db.get(Job, job_id)


class TestRunner:
    def test_runs_a_job_and_records_progress_and_result(self, db, runner, make_user):
        seen = []

        def count(context):
            for step in range(4):
                context.progress(step / 4, f"step {step}")
                seen.append(reload(db, context.job_id).progress)
            return {"total": context.params["n"] * 2}

        runner.register("count", count)
        job = jobs.create_job(db, "count", {"n": 21}, user=make_user())
        assert runner.run_once() == job.id
        done = reload(db, job.id)
        assert (done.status, done.progress, done.result, done.attempts) == (JobStatus.DONE, 1.0, {"total": 42}, 1)
        assert seen == [0.0, 0.25, 0.5, 0.75] and done.started_at and done.finished_at

    def test_a_library_error_fails_the_job_with_its_message(self, db, runner):
        def bad(context):
            raise DataError("images/cat.png is truncated")

        runner.register("bad", bad)
        job = jobs.create_job(db, "bad", user=None)
        runner.run_once()
        failed = reload(db, job.id)
        assert failed.status == JobStatus.FAILED and failed.error == "images/cat.png is truncated"

    def test_a_crash_fails_the_job_without_a_traceback(self, db, runner):
        runner.register("crash", lambda context: 1 / 0)
        job = jobs.create_job(db, "crash", user=None)
        runner.run_once()
        failed = reload(db, job.id)
        assert failed.status == JobStatus.FAILED and failed.error.startswith("internal error (ZeroDivisionError)")
        assert "Traceback" not in failed.error

    def test_a_result_that_is_not_json_fails_the_job(self, db, runner):
        runner.register("weird", lambda context: {"x": object()})
        job = jobs.create_job(db, "weird", user=None)
        runner.run_once()
        assert reload(db, job.id).status == JobStatus.FAILED

    def test_jobs_of_unknown_kinds_stay_queued(self, db, runner):
        runner.register("known", lambda context: None)
        job = jobs.create_job(db, "other", user=None)
        assert runner.run_once() is None
        assert reload(db, job.id).status == JobStatus.QUEUED

    def test_cancel_stops_a_running_job_at_its_next_report(self, db, runner, make_user):
        started, go_on = threading.Event(), threading.Event()

        def slow(context):
            started.set()
            go_on.wait(10)
            context.progress(0.5)
            return {"unreachable": True}

        runner.register("slow", slow)
        user = make_user(Role.RESEARCHER)
        job = jobs.create_job(db, "slow", user=user)
        worker = threading.Thread(target=runner.run_once)
        worker.start()
        assert started.wait(10)
        assert jobs.request_cancel(db, job.id, user=user).cancel_requested
        go_on.set()
        worker.join(10)
        assert reload(db, job.id).status == JobStatus.CANCELLED

    def test_the_worker_thread_picks_up_new_jobs(self, db, runner):
        done = threading.Event()
        runner.register("ping", lambda context: done.set() or {"pong": True})
        runner.start()
        job = jobs.create_job(db, "ping", user=None)
        runner.wake()
        assert done.wait(10)
        for _ in range(200):
            if reload(db, job.id).status == JobStatus.DONE:
                break
            threading.Event().wait(0.02)
        assert reload(db, job.id).result == {"pong": True}


class TestRestart:
    def test_running_jobs_are_requeued_as_resumable(self, db, ctx):
        job = jobs.create_job(db, "embed", {"dataset": "cub"}, user=None)
        claimed = jobs.claim_next(db, ["embed"])  # a process took it ... and died
        assert claimed.status == JobStatus.RUNNING
        resumed_attempts = []
        runner = JobRunner(ctx.session_factory, poll_interval_s=0.05)
        runner.register("embed", lambda context: resumed_attempts.append(context.attempt) or {"ok": True})
        requeued, failed = jobs.requeue_interrupted(db)
        assert (requeued, failed) == ([job.id], [])
        assert reload(db, job.id).status == JobStatus.QUEUED
        runner.run_once()
        assert resumed_attempts == [2] and reload(db, job.id).status == JobStatus.DONE

    def test_a_restarted_runner_resumes_the_job_by_itself(self, db, ctx):
        job = jobs.create_job(db, "train", user=None)
        jobs.claim_next(db, ["train"])  # the previous process died while running it
        finished = threading.Event()
        runner = JobRunner(ctx.session_factory, poll_interval_s=0.05)
        runner.register("train", lambda context: finished.set() or {"attempt": context.attempt})
        runner.start()
        try:
            assert finished.wait(10)
            for _ in range(200):
                if reload(db, job.id).status == JobStatus.DONE:
                    break
                threading.Event().wait(0.02)
        finally:
            runner.stop()
        assert reload(db, job.id).result == {"attempt": 2}

    def test_a_job_interrupted_too_often_fails(self, db):
        job = jobs.create_job(db, "embed", user=None)
        for _ in range(3):
            jobs.claim_next(db, ["embed"])
            jobs.requeue_interrupted(db, max_attempts=3)
        assert reload(db, job.id).status == JobStatus.FAILED
        assert "interrupted 3 times" in reload(db, job.id).error

    def test_a_stopping_runner_hands_the_job_back(self, db, ctx):
        runner = JobRunner(ctx.session_factory, progress_interval_s=0.0)
        started = threading.Event()

        def long(context):
            started.set()
            while True:
                context.progress(0.1)
                threading.Event().wait(0.01)

        runner.register("long", long)
        job = jobs.create_job(db, "long", user=None)
        runner.start()
        runner.wake()
        assert started.wait(10)
        runner.stop()
        assert reload(db, job.id).status == JobStatus.QUEUED


class TestGetJob:
    def test_owner_sees_own_job(self, client, db, make_user, token_headers):
        user = make_user(Role.PARTICIPANT)
        job = jobs.create_job(db, "embed", {"n": 1}, user=user)
        body = client.get(f"/api/v1/jobs/{job.id}", headers=token_headers(user)).json()
        assert body["status"] == "queued" and body["params"] == {"n": 1} and body["progress"] == 0

    def test_another_participant_gets_404(self, client, db, make_user, token_headers):
        job = jobs.create_job(db, "embed", user=make_user(Role.PARTICIPANT))
        assert client.get(f"/api/v1/jobs/{job.id}", headers=token_headers(make_user(Role.PARTICIPANT))).status_code == 404

    @pytest.mark.parametrize("role", ["researcher", "admin"])
    def test_staff_see_every_job(self, client, db, make_user, as_role, role):
        job = jobs.create_job(db, "embed", user=make_user(Role.PARTICIPANT))
        assert client.get(f"/api/v1/jobs/{job.id}", headers=as_role(role)).status_code == 200

    def test_anonymous_is_401(self, client, db):
        job = jobs.create_job(db, "embed", user=None)
        assert client.get(f"/api/v1/jobs/{job.id}").status_code == 401


class TestListJobs:
    def test_participants_see_only_their_own(self, client, db, make_user, token_headers):
        mine, other = make_user(Role.PARTICIPANT), make_user(Role.PARTICIPANT)
        jobs.create_job(db, "a", user=mine)
        jobs.create_job(db, "b", user=other)
        listed = client.get("/api/v1/jobs", headers=token_headers(mine)).json()
        assert [j["kind"] for j in listed] == ["a"]


class TestCancelJob:
    def test_a_queued_job_is_cancelled_at_once(self, client, db, make_user, token_headers):
        user = make_user(Role.RESEARCHER)
        job = jobs.create_job(db, "embed", user=user)
        body = client.post(f"/api/v1/jobs/{job.id}/cancel", headers=token_headers(user)).json()
        assert body["status"] == "cancelled"

    def test_a_finished_job_is_409(self, client, db, make_user, token_headers):
        user = make_user(Role.RESEARCHER)
        job = jobs.create_job(db, "embed", user=user)
        client.post(f"/api/v1/jobs/{job.id}/cancel", headers=token_headers(user))
        assert client.post(f"/api/v1/jobs/{job.id}/cancel", headers=token_headers(user)).status_code == 409

    def test_another_participants_job_is_404(self, client, db, make_user, token_headers):
        job = jobs.create_job(db, "embed", user=make_user(Role.PARTICIPANT))
        response = client.post(f"/api/v1/jobs/{job.id}/cancel", headers=token_headers(make_user(Role.PARTICIPANT)))
        assert response.status_code == 404
        assert reload(db, job.id).status == JobStatus.QUEUED
