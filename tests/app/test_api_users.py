"""/api/v1/users and /api/v1/tokens: one class per endpoint, permission cases as methods."""

import pytest

from app.models import Role


class TestGetMe:
    def test_anonymous_is_401(self, client):
        assert client.get("/api/v1/users/me").status_code == 401

    @pytest.mark.parametrize("role", ["participant", "researcher", "admin"])
    def test_every_role_sees_itself(self, client, make_user, token_headers, role):
        user = make_user(role)
        body = client.get("/api/v1/users/me", headers=token_headers(user)).json()
        assert body["id"] == user.id and body["role"] == role
        assert "password_hash" not in body


class TestListUsers:
    def test_admin(self, client, as_role):
        assert client.get("/api/v1/users", headers=as_role("admin")).status_code == 200

    @pytest.mark.parametrize("role", ["participant", "researcher"])
    def test_others_are_forbidden(self, client, as_role, role):
        assert client.get("/api/v1/users", headers=as_role(role)).status_code == 403


class TestCreateUser:
    def test_admin_creates(self, client, as_role):
        response = client.post("/api/v1/users", json={"name": "erin", "role": "participant"}, headers=as_role("admin"))
        assert response.status_code == 201 and response.json()["role"] == "participant"

    def test_duplicate_name_is_409(self, client, as_role):
        headers = as_role("admin")
        client.post("/api/v1/users", json={"name": "erin", "role": "participant"}, headers=headers)
        response = client.post("/api/v1/users", json={"name": "erin", "role": "admin"}, headers=headers)
        assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"

    def test_bad_role_or_short_password_is_422(self, client, as_role):
        headers = as_role("admin")
        assert client.post("/api/v1/users", json={"name": "x", "role": "boss"}, headers=headers).status_code == 422
        assert client.post("/api/v1/users", json={"name": "x", "role": "admin", "password": "short"},
                           headers=headers).status_code == 422
        assert client.post("/api/v1/users", json={"name": "../x", "role": "admin"}, headers=headers).status_code == 422

    def test_researcher_cannot_create_an_admin(self, client, as_role):
        response = client.post("/api/v1/users", json={"name": "eve", "role": "admin"}, headers=as_role("researcher"))
        assert response.status_code == 403


class TestUpdateUser:
    def test_admin_changes_role_and_deactivates(self, client, as_role, make_user):
        target = make_user(Role.PARTICIPANT)
        headers = as_role("admin")
        response = client.patch(f"/api/v1/users/{target.id}", json={"role": "researcher", "is_active": False},
                                headers=headers)
        assert response.status_code == 200
        assert response.json()["role"] == "researcher" and response.json()["is_active"] is False

    def test_unknown_user_is_404(self, client, as_role):
        assert client.patch("/api/v1/users/999", json={"is_active": False}, headers=as_role("admin")).status_code == 404

    def test_participant_cannot_promote_itself(self, client, make_user, token_headers):
        user = make_user(Role.PARTICIPANT)
        response = client.patch(f"/api/v1/users/{user.id}", json={"role": "admin"}, headers=token_headers(user))
        assert response.status_code == 403


class TestCreateToken:
    def test_returns_the_token_once(self, client, make_user, token_headers):
        user = make_user(Role.PARTICIPANT)
        response = client.post("/api/v1/tokens", json={"name": "laptop"}, headers=token_headers(user))
        assert response.status_code == 201
        token = response.json()["token"]
        assert token.startswith("pcbm_") and response.json()["prefix"] == token[:12]
        assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}).json()["id"] == user.id
        listed = client.get("/api/v1/tokens", headers=token_headers(user)).json()
        assert all("token" not in t for t in listed)

    def test_anonymous_is_401(self, client):
        assert client.post("/api/v1/tokens", json={"name": "x"}).status_code == 401


class TestListTokens:
    def test_only_the_callers_own(self, client, make_user, token_headers):
        alice, bob = make_user(Role.RESEARCHER), make_user(Role.ADMIN)
        alice_headers = token_headers(alice)
        token_headers(bob)
        names = [t["id"] for t in client.get("/api/v1/tokens", headers=alice_headers).json()]
        assert len(names) == 1


class TestRevokeToken:
    def test_revokes_own(self, client, make_user, token_headers):
        user = make_user(Role.RESEARCHER)
        headers = token_headers(user)
        extra = client.post("/api/v1/tokens", json={"name": "old"}, headers=headers).json()
        response = client.delete(f"/api/v1/tokens/{extra['id']}", headers=headers)
        assert response.status_code == 200 and response.json()["revoked"] is True
        assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {extra['token']}"}).status_code == 401

    def test_another_users_token_is_not_found(self, client, make_user, token_headers):
        victim, attacker = make_user(Role.ADMIN), make_user(Role.RESEARCHER)
        victim_headers = token_headers(victim)
        victim_token = client.get("/api/v1/tokens", headers=victim_headers).json()[0]
        response = client.delete(f"/api/v1/tokens/{victim_token['id']}", headers=token_headers(attacker))
        assert response.status_code == 404
        assert client.get("/api/v1/users/me", headers=victim_headers).status_code == 200
