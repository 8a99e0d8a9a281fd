"""Authentication: no default account, session cookie + CSRF, bearer tokens, rate limit, login links."""

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.db import utcnow
from app.models import ApiToken, LoginLink, Role, User
from app.security import hash_password, verify_password
from app.services import users as user_service

PASSWORD = "correct horse battery"


def login(client, name, password=PASSWORD, **kwargs):
    return client.post("/api/v1/auth/login", json={"name": name, "password": password}, **kwargs)


def test_a_fresh_database_has_no_accounts(client, db):
    assert db.scalars(select(User)).all() == []
    for name, password in [("admin", "admin"), ("admin", "password"), ("root", "root"), ("demo", "demo")]:
        assert login(client, name, password).status_code == 401


def test_passwords_are_stored_as_salted_scrypt():
    stored = hash_password(PASSWORD)
    assert stored.startswith("scrypt$") and PASSWORD not in stored
    assert stored != hash_password(PASSWORD)
    assert verify_password(PASSWORD, stored) and not verify_password("wrong", stored)
    assert not verify_password(PASSWORD, None) and not verify_password(PASSWORD, "garbage")


class TestLogin:
    @pytest.fixture
    def alice(self, make_user):
        return make_user(Role.RESEARCHER, name="alice", password=PASSWORD)

    def test_sets_an_httponly_samesite_cookie(self, client, alice):
        response = login(client, "alice")
        assert response.status_code == 200
        assert response.json()["user"]["name"] == "alice" and response.json()["csrf_token"]
        cookie = response.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
        assert client.get("/api/v1/users/me").json()["name"] == "alice"

    def test_the_cookie_is_secure_over_https(self, app, alice):
        with TestClient(app, base_url="https://testserver") as https_client:
            response = login(https_client, "alice")
        assert "secure" in response.headers["set-cookie"].lower()

    def test_wrong_password_and_unknown_user_look_the_same(self, client, alice):
        wrong, unknown = login(client, "alice", "nope-nope"), login(client, "mallory", "nope-nope")
        assert wrong.status_code == unknown.status_code == 401
        assert wrong.json() == unknown.json()

    def test_a_user_without_password_cannot_log_in_with_one(self, client, make_user):
        make_user(Role.RESEARCHER, name="tokenonly")
        assert login(client, "tokenonly", "").status_code == 422
        assert login(client, "tokenonly", "anything").status_code == 401

    def test_an_inactive_user_cannot_log_in(self, client, db, alice):
        user_service.update_user(db, alice.id, actor=None, is_active=False)
        assert login(client, "alice").status_code == 401

    def test_repeated_failures_are_rate_limited_per_user_and_ip(self, client, ctx, alice):
        limit = ctx.settings.login_rate_limit
        for _ in range(limit):
            assert login(client, "alice", "wrong-password").status_code == 401
        blocked = login(client, "alice")  # even the right password waits
        assert blocked.status_code == 429
        assert blocked.json()["error"]["code"] == "rate_limited"
        assert int(blocked.headers["retry-after"]) > 0
        assert login(client, "bob", "wrong-password").status_code == 401  # other users are not locked out

    def test_a_success_resets_the_count(self, client, ctx, alice):
        for _ in range(ctx.settings.login_rate_limit - 1):
            login(client, "alice", "wrong-password")
        assert login(client, "alice").status_code == 200
        assert login(client, "alice", "wrong-password").status_code == 401


class TestCsrf:
    @pytest.fixture
    def browser(self, client, make_user):
        make_user(Role.RESEARCHER, name="carol", password=PASSWORD)
        token = login(client, "carol").json()["csrf_token"]
        return client, token

    def test_a_state_change_without_the_token_is_refused(self, browser):
        client, _ = browser
        response = client.post("/api/v1/tokens", json={"name": "laptop"})
        assert response.status_code == 403 and "CSRF" in response.json()["error"]["message"]

    def test_a_wrong_token_is_refused(self, browser):
        client, _ = browser
        assert client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": "forged"}).status_code == 403

    def test_the_header_is_accepted(self, browser):
        client, token = browser
        assert client.post("/api/v1/tokens", json={"name": "x"}, headers={"X-CSRF-Token": token}).status_code == 201

    def test_the_form_field_is_accepted(self, browser):
        client, token = browser
        assert client.post("/api/v1/auth/logout", data={"csrf_token": "forged"}).status_code == 403
        assert client.post("/api/v1/auth/logout", data={"csrf_token": token}).status_code == 200

    def test_reads_need_no_token(self, browser):
        client, _ = browser
        assert client.get("/api/v1/tokens").status_code == 200

    def test_the_session_endpoint_returns_the_token(self, browser):
        client, token = browser
        assert client.get("/api/v1/auth/session").json()["csrf_token"] == token

    def test_bearer_requests_need_no_token(self, client, make_user, token_headers):
        headers = token_headers(make_user(Role.RESEARCHER))
        assert client.post("/api/v1/tokens", json={"name": "ci"}, headers=headers).status_code == 201


class TestLogout:
    def test_clears_the_cookie(self, client, make_user):
        make_user(Role.RESEARCHER, name="dave", password=PASSWORD)
        token = login(client, "dave").json()["csrf_token"]
        response = client.post("/api/v1/auth/logout", headers={"X-CSRF-Token": token})
        assert response.status_code == 200
        assert client.get("/api/v1/users/me").status_code == 401


class TestBearerTokens:
    def test_a_token_authenticates_and_is_stored_hashed(self, client, db, make_user):
        user = make_user(Role.PARTICIPANT)
        _, plain = user_service.create_token(db, user, "script")
        response = client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {plain}"})
        assert response.status_code == 200 and response.json()["id"] == user.id
        stored = db.scalars(select(ApiToken.token_hash)).all()
        assert plain not in stored and all(len(h) == 64 for h in stored)

    def test_an_unknown_token_is_refused_with_a_challenge(self, client):
        response = client.get("/api/v1/users/me", headers={"Authorization": "Bearer pcbm_nope"})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"

    def test_a_revoked_token_stops_working(self, client, db, make_user):
        user = make_user(Role.RESEARCHER)
        token, plain = user_service.create_token(db, user, "old")
        user_service.revoke_token(db, user, token.id)
        assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {plain}"}).status_code == 401

    def test_a_deactivated_users_token_stops_working(self, client, db, make_user, token_headers):
        user = make_user(Role.RESEARCHER)
        headers = token_headers(user)
        user_service.update_user(db, user.id, actor=None, is_active=False)
        assert client.get("/api/v1/users/me", headers=headers).status_code == 401

    def test_last_used_is_recorded(self, client, db, make_user):
        user = make_user(Role.RESEARCHER)
        token, plain = user_service.create_token(db, user, "t")
        client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {plain}"})
        db.expire_all()
        assert db.get(ApiToken, token.id).last_used_at is not None


class TestLoginOnce:
    def link(self, db, user, ttl_s=60):
        return user_service.create_login_link(db, user, ttl_s=ttl_s)

    def test_logs_in_once_and_redirects_home(self, client, db, make_user):
        user = make_user(Role.ADMIN)
        path = self.link(db, user)
        assert path.startswith("/login/once?token=")
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "httponly" in response.headers["set-cookie"].lower()
        assert client.get("/api/v1/users/me").json()["id"] == user.id

    def test_a_link_works_only_once(self, app, db, make_user):
        path = self.link(db, make_user(Role.ADMIN))
        with TestClient(app) as first, TestClient(app) as second:
            assert first.get(path, follow_redirects=False).status_code == 303
            reused = second.get(path, follow_redirects=False)
        assert reused.status_code == 401 and "set-cookie" not in reused.headers

    def test_an_expired_link_is_refused(self, client, db, make_user):
        path = self.link(db, make_user(Role.ADMIN))
        db.execute(update(LoginLink).values(expires_at=utcnow() - timedelta(seconds=1)))
        db.commit()
        assert client.get(path, follow_redirects=False).status_code == 401

    def test_a_made_up_token_is_refused(self, client):
        assert client.get("/login/once?token=guess", follow_redirects=False).status_code == 401
        assert client.get("/login/once", follow_redirects=False).status_code == 422

    def test_only_the_hash_is_stored(self, db, make_user):
        path = self.link(db, make_user(Role.ADMIN))
        token = path.split("token=")[1]
        assert token not in db.scalars(select(LoginLink.token_hash)).all()
