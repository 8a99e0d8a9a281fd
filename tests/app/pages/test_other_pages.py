"""Home, concept bank, jobs, nav shortcuts, error pages and flash messages."""

import re

from sqlalchemy import select

from app.models import Model, Role
from app.services import inspect
from app.services import jobs as job_service
from app.templating import pct

from .helpers import sign_in, text_of
from .world import CONCEPTS


class TestHome:
    def test_lists_models_with_their_parts_version_and_accuracy(self, client, ctx, db, served, browser):
        response = client.get("/")
        assert response.status_code == 200
        text = text_of(response.text)
        ident = db.scalar(select(Model.id).where(Model.name == served))
        summary = inspect.model_summary(ctx.models, db, ident)
        assert f"{served} demo tiny" in text and "tiny-concepts v1" in text
        for split in ("train", "test", "test_shifted"):
            assert split in text and pct(summary["accuracy"][split]) in text

    def test_participants_see_no_models(self, client, db, served, make_user):
        sign_in(client, db, make_user(Role.PARTICIPANT))
        text = text_of(client.get("/").text)
        assert served not in text and "through their studies" in text

    def test_nav_shortcuts_go_to_the_first_model(self, client, served, browser):
        assert client.get("/images", follow_redirects=False).headers["location"] == f"/models/{served}/images"
        assert client.get("/concepts", follow_redirects=False).headers["location"] == f"/models/{served}/bank"


class TestBank:
    def test_lists_source_quality_weight_and_flags(self, client, served, browser):
        response = client.get(f"/models/{served}/bank")
        assert response.status_code == 200
        text = text_of(response.text)
        for concept in CONCEPTS:
            assert concept in text
        assert "0.97 CAV accuracy" in text and "0.91 AUROC" in text and "“a striped animal”" in text
        flagged = re.findall(r'<tr class="flagged">\s*<th scope="row">([^<]+)', response.text)
        assert flagged == ["water"]  # a large weight, rarely really there
        assert "1 concept has a high weight but low existence" in text
        water_row = text_of(response.text[response.text.index('<tr class="flagged">'):]).split("⚠")[0]
        assert "2.500" in water_row


class TestJobs:
    def test_progress_page_and_polling_fragment(self, client, db, browser, researcher):
        job = job_service.create_job(db, "embed", {"title": "Embedding <tiny>"}, user=researcher)
        page = client.get(f"/jobs/{job.id}")
        assert page.status_code == 200 and "Embedding <tiny>" in text_of(page.text) and "<tiny>" not in page.text
        assert f'hx-get="/jobs/{job.id}/progress"' in page.text and 'hx-trigger="every 1s"' in page.text
        fragment = client.get(f"/jobs/{job.id}/progress")
        assert "<html" not in fragment.text and "queued" in fragment.text
        claimed = job_service.claim_next(db, ["embed"])
        job_service.report_progress(db, claimed.id, 0.5, "embedding batch 3")
        assert "50%" in text_of(client.get(f"/jobs/{job.id}/progress").text)
        job_service.mark_done(db, job.id, {"url": "https://evil.example/"})
        done = client.get(f"/jobs/{job.id}/progress").text
        assert "hx-trigger" not in done and "evil.example" not in done

    def test_other_peoples_jobs_are_hidden_from_participants(self, client, db, make_user):
        owner = make_user(Role.ADMIN)
        job = job_service.create_job(db, "train", user=owner)
        sign_in(client, db, make_user(Role.PARTICIPANT))
        assert client.get(f"/jobs/{job.id}").status_code == 404
        assert client.get("/jobs", follow_redirects=False).headers["location"] == "/"

    def test_jobs_index_goes_to_the_newest(self, client, db, browser, researcher):
        job_service.create_job(db, "embed", user=researcher)
        newest = job_service.create_job(db, "train", user=researcher)
        assert client.get("/jobs", follow_redirects=False).headers["location"] == f"/jobs/{newest.id}"


class TestErrors:
    def test_error_pages_are_html_with_the_status(self, client, browser):
        for path, status in (("/jobs/999", 404), ("/jobs/abc", 422), ("/models/none/history", 404)):
            response = client.get(path)
            assert response.status_code == status and response.headers["content-type"].startswith("text/html")
            assert "Traceback" not in response.text and "Back to the models" in response.text

    def test_a_crash_is_a_500_page_without_internals(self, client, ctx, served, browser, monkeypatch):
        def boom(*args, **kwargs):
            raise RuntimeError("secret internals")

        monkeypatch.setattr(inspect, "head_matrix", boom)
        response = client.get(f"/models/{served}")
        assert response.status_code == 500 and "secret internals" not in response.text
        assert "Something went wrong" in text_of(response.text)

    def test_flash_messages_show_once(self, client, db, served, browser):
        client.post(f"/models/{served}/revert", data={"csrf_token": browser, "version": 1, "base_version": 1})
        commit = client.post(f"/models/{served}/commit", data={
            "csrf_token": browser, "base_version": 1, "message": "m",
            "edits": '[{"op": "prune", "concept": "sky"}]'})
        assert "Saved as version 2" in text_of(commit.text)
        assert "Saved as version 2" not in text_of(client.get(f"/models/{served}").text)
