"""Every error has one JSON shape, a fitting status, and never a traceback."""

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from app.main import create_app
from app.models import Role
from ml.errors import ConfigError, DataError, ShapeError

from .conftest import make_settings


def assert_error(response, status, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text
    if code:
        assert body["error"]["code"] == code
    return body["error"]


@pytest.fixture
def researcher(as_role):
    return as_role("researcher")


class TestNotFound:
    def test_unknown_route(self, client):
        assert_error(client.get("/nope"), 404, "not_found")

    def test_unknown_id(self, client, researcher):
        error = assert_error(client.get("/api/v1/models/4242", headers=researcher), 404, "not_found")
        assert "4242" in error["message"]

    def test_unknown_job(self, client, researcher):
        assert_error(client.get("/api/v1/jobs/4242", headers=researcher), 404, "not_found")

    def test_wrong_method(self, client):
        assert_error(client.delete("/healthz"), 405, "method_not_allowed")


class TestValidation:
    def test_malformed_json(self, client, researcher):
        response = client.post("/api/v1/tokens", content=b"{not json", headers={**researcher, "content-type": "application/json"})
        assert_error(response, 422, "validation_error")

    def test_wrong_types_and_extra_fields(self, client, researcher):
        error = assert_error(client.post("/api/v1/tokens", json={"name": 5, "admin": True}, headers=researcher),
                             422, "validation_error")
        assert {tuple(e["loc"]) for e in error["detail"]} >= {("body", "name"), ("body", "admin")}

    def test_a_bad_path_parameter(self, client, researcher):
        assert_error(client.get("/api/v1/models/abc", headers=researcher), 422, "validation_error")

    def test_the_input_is_not_echoed_back(self, client, researcher):
        payload = "<script>alert(1)</script>"
        response = client.post("/api/v1/tokens", json={"name": {"x": payload}}, headers=researcher)
        assert_error(response, 422)
        assert payload not in response.text


class TestBodyLimit:
    @pytest.fixture
    def small_client(self, workspace):
        with TestClient(create_app(make_settings(workspace, max_upload_bytes=1024))) as client:
            yield client

    def test_a_declared_large_body_is_refused(self, small_client):
        response = small_client.post("/api/v1/auth/login", content=b"x" * 4096,
                                     headers={"content-type": "application/json"})
        error = assert_error(response, 413, "payload_too_large")
        assert error["detail"] == {"max_bytes": 1024}

    def test_a_chunked_body_is_counted(self, small_client):
        def chunks():
            for _ in range(8):
                yield b"x" * 512

        response = small_client.post("/api/v1/auth/login", content=chunks(),
                                     headers={"content-type": "application/json"})
        assert "content-length" not in response.request.headers
        assert assert_error(response, 413, "payload_too_large")["detail"] == {"max_bytes": 1024}

    def test_a_chunked_form_is_counted(self, small_client):
        def chunks():
            yield b"csrf_token="
            for _ in range(8):
                yield b"a" * 512

        response = small_client.post("/api/v1/auth/logout", content=chunks(),
                                     headers={"content-type": "application/x-www-form-urlencoded"})
        assert_error(response, 413, "payload_too_large")

    def test_a_small_body_passes(self, small_client):
        response = small_client.post("/api/v1/auth/login", json={"name": "x", "password": "y"})
        assert_error(response, 401)


class TestServerAndLibraryErrors:
    @pytest.fixture
    def raising_client(self, workspace):
        app = create_app(make_settings(workspace))
        errors = {
            "crash": RuntimeError("secret internals /etc/passwd"),
            "data": DataError("invalid path '../x': '..' is not allowed"),
            "config": ConfigError("unknown concept 'wings'"),
            "shape": ShapeError("weights have 3 columns, the bank 5"),
            "db": OperationalError("SELECT 1", {}, Exception("database is locked")),
        }

        @app.get("/boom/{name}")
        def boom(name: str) -> dict:
            raise errors[name]

        with TestClient(app, raise_server_exceptions=False) as client:
            yield client

    def test_an_unexpected_error_is_a_bare_500(self, raising_client):
        response = raising_client.get("/boom/crash")
        error = assert_error(response, 500, "internal_error")
        assert "secret internals" not in response.text and error["detail"] is None

    @pytest.mark.parametrize("name,status,code", [
        ("data", 400, "data_error"), ("config", 422, "config_error"), ("shape", 422, "shape_error"),
    ])
    def test_library_errors_keep_their_message(self, raising_client, name, status, code):
        error = assert_error(raising_client.get(f"/boom/{name}"), status, code)
        assert error["message"] and "Traceback" not in error["message"]

    def test_a_busy_database_is_503(self, raising_client):
        response = raising_client.get("/boom/db")
        assert_error(response, 503, "database_unavailable")
        assert response.headers["retry-after"]


def test_security_headers_are_set(client):
    response = client.get("/healthz")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


def test_openapi_documents_every_endpoint_with_models(client):
    schema = client.get("/openapi.json").json()
    assert client.get("/docs").status_code == 200
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            ok = [code for code in operation["responses"] if code[0] in "23"]
            assert ok, f"{method.upper()} {path} declares no success response"
            if method in ("post", "patch", "put") and path.startswith("/api/v1") and not path.endswith(("/cancel", "/logout")):
                assert "requestBody" in operation, f"{method.upper()} {path} declares no request body"


def test_roles_are_plain_strings_in_responses(client, as_role):
    assert client.get("/api/v1/users/me", headers=as_role("participant")).json()["role"] == Role.PARTICIPANT.value


def test_api_docs_load_only_vendored_assets(client):
    """/docs must work offline: every script and stylesheet is served by the app itself."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text) + re.findall(r"url: '([^']+)'", page.text)
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
