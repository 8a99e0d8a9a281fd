"""Signing in and out through the HTML pages: CSRF, failures, rate limits, safe redirects."""

from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.models import Role
from app.routes.pages.auth import LOGIN_CSRF_COOKIE
from app.routes.pages.common import safe_next

from ..conftest import make_settings
from .helpers import hidden_value, sign_in, text_of

PASSWORD = "correct horse battery"


def login_form(client: TestClient, next_path: str | None = None) -> str:
    response = client.get("/login", params={"next": next_path} if next_path else None)
    assert response.status_code == 200
    return hidden_value(response.text, "csrf_token")


def post_login(client: TestClient, name: str, password: str, token: str | None, next_path: str = ""):
    data = {"username": name, "password": password, "next": next_path}
    if token is not None:
        data["csrf_token"] = token
    return client.post("/login", data=data, follow_redirects=False)


class TestLoginPage:
    def test_form_has_a_token_that_matches_its_cookie(self, client):
        token = login_form(client)
        assert token and client.cookies.get(LOGIN_CSRF_COOKIE) == token

    def test_right_password_signs_in_and_goes_home(self, client, make_user):
        make_user(Role.RESEARCHER, name="ada", password=PASSWORD)
        response = post_login(client, "ada", PASSWORD, login_form(client))
        assert response.status_code == 303 and response.headers["location"] == "/"
        home = client.get("/")
        assert home.status_code == 200 and "ada" in text_of(home.text)

    def test_wrong_password_shows_a_message_and_keeps_the_name(self, client, make_user):
        make_user(Role.RESEARCHER, name="ada", password=PASSWORD)
        response = post_login(client, "ada", "not the password", login_form(client))
        assert response.status_code == 401
        assert "Wrong name or password" in text_of(response.text)
        assert 'value="ada"' in response.text
        assert client.get("/", follow_redirects=False).status_code == 303  # still signed out

    def test_missing_or_wrong_csrf_token_is_refused(self, client, make_user):
        make_user(Role.RESEARCHER, name="ada", password=PASSWORD)
        login_form(client)
        assert post_login(client, "ada", PASSWORD, None).status_code == 403
        assert post_login(client, "ada", PASSWORD, "forged").status_code == 403
        fresh = TestClient(client.app)  # no cookie at all
        assert post_login(fresh, "ada", PASSWORD, "anything").status_code == 403

    def test_failures_are_rate_limited(self, workspace, make_user):
        app = create_app(make_settings(workspace, login_rate_limit=2))
        with TestClient(app) as client:
            from app.services import users as user_service

            with app.state.ctx.session_factory() as session:
                user_service.create_user(session, "bob", Role.RESEARCHER, PASSWORD)
            for _ in range(2):
                assert post_login(client, "bob", "wrong password", login_form(client)).status_code == 401
            response = post_login(client, "bob", PASSWORD, login_form(client))
            assert response.status_code == 429
            assert "too many failed logins" in text_of(response.text).lower()
            assert int(response.headers["retry-after"]) > 0

    def test_signed_in_user_skips_the_form(self, client, db, make_user):
        sign_in(client, db, make_user(Role.RESEARCHER))
        response = client.get("/login?next=/jobs", follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/jobs"


class TestNextRedirect:
    @pytest.mark.parametrize("target", [
        "https://evil.example/", "//evil.example/x", "/\\evil.example", "\\\\evil.example", "javascript:alert(1)",
        "http:/evil.example", "/ok\r\nSet-Cookie: x=1", "evil.example", "",
    ])
    def test_off_site_targets_are_refused(self, client, make_user, target):
        make_user(Role.RESEARCHER, name="ada", password=PASSWORD)
        response = post_login(client, "ada", PASSWORD, login_form(client), next_path=target)
        assert response.status_code == 303 and response.headers["location"] == "/"

    def test_a_local_target_is_followed(self, client, make_user):
        make_user(Role.RESEARCHER, name="ada", password=PASSWORD)
        response = post_login(client, "ada", PASSWORD, login_form(client), next_path="/models/x/history?a=1&b=2")
        assert response.headers["location"] == "/models/x/history?a=1&b=2"

    def test_off_site_next_is_not_even_put_in_the_form(self, client):
        response = client.get("/login", params={"next": "//evil.example"})
        assert "evil.example" not in response.text

    def test_safe_next(self):
        assert safe_next("/a?b=c#d") == "/a?b=c#d"
        assert safe_next("//x") is None and safe_next("/\\x") is None and safe_next("https://x/") is None


class TestSignedOut:
    @pytest.mark.parametrize("path", ["/", "/models/birds/history?a=1", "/jobs/1", "/images"])
    def test_pages_redirect_to_the_login_page_with_next(self, client, path):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303
        location = urlsplit(response.headers["location"])
        assert location.path == "/login"
        assert parse_qs(location.query).get("next", ["/"])[0] == path

    def test_htmx_fragments_ask_htmx_to_redirect(self, client):
        response = client.get("/jobs/1/progress", headers={"HX-Request": "true"}, follow_redirects=False)
        assert response.status_code == 401 and response.headers["HX-Redirect"].startswith("/login")

    def test_a_bad_bearer_token_is_an_html_401(self, client):
        response = client.get("/", headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401 and response.headers["content-type"].startswith("text/html")


class TestLogout:
    def test_needs_the_csrf_token(self, client, db, make_user):
        csrf = sign_in(client, db, make_user(Role.RESEARCHER))
        refused = client.post("/logout", follow_redirects=False)
        assert refused.status_code == 403 and "CSRF" in refused.text
        assert client.get("/", follow_redirects=False).status_code == 200  # still signed in
        response = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login"
        assert client.get("/", follow_redirects=False).status_code == 303
        assert "You are signed out" in text_of(client.get("/login").text)
