"""The `pcbm` command: db, users, tokens, serve; one-line errors with exit status 2."""

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app import cli
from app.main import create_app
from app.migrate import head_revision

from .conftest import TEST_SECRET, make_settings

runner = CliRunner()


def pcbm(*args, input=None):
    return runner.invoke(cli.app, [str(a) for a in args], input=input)


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.setenv("PCBM_SECRET_KEY", TEST_SECRET)
    return tmp_path / "ws"


def test_db_upgrade_then_current(ws):
    head = head_revision()
    result = pcbm("db", "upgrade", "--workspace", ws)
    assert result.exit_code == 0 and head in result.output
    assert (ws / "pcbm.db").is_file()
    assert pcbm("db", "upgrade", "-w", ws).exit_code == 0  # idempotent
    assert f"database: {head}" in pcbm("db", "current", "-w", ws).output


def test_commands_on_an_unmigrated_database_say_what_to_do(ws):
    assert_one_line_error(pcbm("users", "create", "alice", "-w", ws), "pcbm db upgrade")
    assert_one_line_error(pcbm("serve", "-w", ws), "pcbm db upgrade")


def test_users_create_with_a_password_from_stdin_then_log_in(ws):
    pcbm("db", "upgrade", "-w", ws)
    result = pcbm("users", "create", "alice", "--role", "admin", "--password-stdin", "-w", ws,
                  input="a long password\n")
    assert result.exit_code == 0 and "created admin 'alice'" in result.output
    with TestClient(create_app(make_settings(ws))) as client:
        response = client.post("/api/v1/auth/login", json={"name": "alice", "password": "a long password"})
    assert response.status_code == 200


def test_user_errors_are_one_line(ws):
    pcbm("db", "upgrade", "-w", ws)
    pcbm("users", "create", "bob", "-w", ws)
    assert_one_line_error(pcbm("users", "create", "bob", "-w", ws), "already exists")
    assert_one_line_error(pcbm("users", "create", "carol", "--role", "boss", "-w", ws), "unknown role")
    assert_one_line_error(pcbm("users", "create", "dave", "--password-stdin", "-w", ws, input="short\n"),
                          "at least 8")
    assert_one_line_error(pcbm("tokens", "create", "nobody", "-w", ws), "no user named")


def test_tokens_create_prints_a_working_token(ws):
    pcbm("db", "upgrade", "-w", ws)
    pcbm("users", "create", "erin", "--role", "participant", "-w", ws)
    result = pcbm("tokens", "create", "erin", "-w", ws)
    token = result.output.strip()
    assert result.exit_code == 0 and token.startswith("pcbm_")
    with TestClient(create_app(make_settings(ws))) as client:
        assert client.get("/api/v1/users/me", headers={"Authorization": f"Bearer {token}"}).json()["name"] == "erin"


def test_users_link_prints_a_one_time_login_link(ws):
    pcbm("db", "upgrade", "-w", ws)
    pcbm("users", "create", "frank", "--role", "admin", "-w", ws)
    link = pcbm("users", "link", "frank", "--base-url", "http://localhost:9000/", "-w", ws).output.strip()
    assert link.startswith("http://localhost:9000/login/once?token=")
    with TestClient(create_app(make_settings(ws))) as client:
        path = link.removeprefix("http://localhost:9000")
        assert client.get(path, follow_redirects=False).status_code == 303
        assert client.get("/api/v1/users/me").json()["name"] == "frank"


def test_invalid_settings_are_one_line(ws, monkeypatch):
    monkeypatch.setenv("PCBM_PRODUCTION", "true")
    monkeypatch.delenv("PCBM_SECRET_KEY")
    assert_one_line_error(pcbm("db", "upgrade", "-w", ws), "PCBM_SECRET_KEY")
    monkeypatch.setenv("PCBM_PRODUCTION", "false")
    monkeypatch.setenv("PCBM_MAX_UPLOAD_BYTES", "lots")
    assert_one_line_error(pcbm("db", "upgrade", "-w", ws), "PCBM_MAX_UPLOAD_BYTES")


def test_serve_starts_uvicorn_on_a_migrated_database(ws, monkeypatch):
    import uvicorn

    pcbm("db", "upgrade", "-w", ws)
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    result = pcbm("serve", "-w", ws, "--host", "127.0.0.1", "--port", "8123")
    assert result.exit_code == 0, result.output
    assert calls and calls[0][1]["port"] == 8123 and calls[0][0].state.ctx.settings.workspace == ws.resolve()


def test_the_library_commands_are_mounted():
    import typer

    group = typer.main.get_command(cli.app)
    assert {"db", "users", "tokens", "serve"} <= set(group.commands)
    try:
        import ml.cli  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("ml.cli is not there yet")
    assert "embed" in group.commands
