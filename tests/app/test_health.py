"""/healthz is 200 while alive; /readyz is 503 until database, schema and models are ready."""

import threading

from fastapi.testclient import TestClient

from app.main import create_app

from .conftest import make_settings


class TestHealthz:
    def test_alive(self, client):
        response = client.get("/healthz")
        assert response.status_code == 200 and response.json() == {"status": "alive"}

    def test_alive_even_when_the_database_is_not(self, tmp_path):
        app = create_app(make_settings(tmp_path), check_schema=False)  # empty database, never migrated
        with TestClient(app) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").status_code == 503


class TestReadyz:
    def test_ready(self, client):
        response = client.get("/readyz")
        assert response.status_code == 200
        assert response.json() == {"status": "ready", "checks": {"database": True, "migrations": True, "models": True}}

    def test_not_ready_until_the_models_are_loaded(self, settings):
        release = threading.Event()
        app = create_app(settings, model_loader=lambda ctx: release.wait(10))
        with TestClient(app) as client:
            waiting = client.get("/readyz")
            assert waiting.status_code == 503
            assert waiting.json()["error"]["code"] == "unavailable"
            assert waiting.json()["error"]["detail"]["checks"] == {"database": True, "migrations": True, "models": False}
            release.set()
            for _ in range(100):
                if app.state.ctx.readiness.models_loaded:
                    break
                threading.Event().wait(0.02)
            assert client.get("/readyz").status_code == 200

    def test_a_failed_model_load_keeps_it_unready_with_the_reason(self, settings):
        def broken(ctx):
            raise RuntimeError("checkpoint missing")

        app = create_app(settings, model_loader=broken)
        with TestClient(app) as client:
            for _ in range(100):
                if app.state.ctx.readiness.models_error:
                    break
                threading.Event().wait(0.02)
            response = client.get("/readyz")
        assert response.status_code == 503 and "checkpoint missing" in response.json()["error"]["message"]

    def test_an_unmigrated_database_is_not_ready(self, tmp_path):
        app = create_app(make_settings(tmp_path), check_schema=False)
        with TestClient(app) as client:
            body = client.get("/readyz").json()["error"]
        assert body["detail"]["checks"]["migrations"] is False and "pcbm db upgrade" in body["message"]

    def test_the_model_service_flag_is_exposed(self, app):
        readiness = app.state.ctx.readiness
        readiness.set_models_loaded(False)
        with TestClient(app) as client:
            readiness.set_models_loaded(False)  # the default loader ran at startup; undo it
            assert client.get("/readyz").status_code == 503
            readiness.set_models_loaded(True)
            assert client.get("/readyz").status_code == 200
