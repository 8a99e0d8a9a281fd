"""Settings: every field documented, sane defaults, and no default secret."""

import re
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import SECRET_KEY_FILE, Settings, load_secret_key

DOCS = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def documented_variables() -> set[str]:
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("|")]
    return {m.group(1) for line in rows if (m := re.match(r"\|\s*`(PCBM_[A-Z0-9_]+)`", line))}


def test_every_setting_is_documented_in_the_table():
    documented = documented_variables()
    declared = {f"PCBM_{name.upper()}" for name in Settings.model_fields}
    assert declared - documented == set(), "add these settings to docs/settings.md"
    assert documented - declared == set(), "docs/settings.md lists settings that do not exist"


def test_every_setting_has_a_help_text():
    missing = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert missing == []


def test_the_documentation_check_would_notice_a_missing_row():
    assert "PCBM_MAX_UPLOAD_BYTES" in documented_variables()
    assert "PCBM_NOT_A_SETTING" not in documented_variables()


def test_defaults_live_in_the_workspace(tmp_path):
    settings = Settings(workspace=tmp_path / "ws")
    assert settings.database_url == f"sqlite:///{tmp_path / 'ws' / 'pcbm.db'}"
    assert settings.artifact_dir == tmp_path / "ws" / "artifacts"
    assert settings.production is False and settings.device == "auto"


def test_environment_variables_use_the_pcbm_prefix(monkeypatch, tmp_path):
    monkeypatch.setenv("PCBM_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("PCBM_MAX_UPLOAD_BYTES", "1234")
    monkeypatch.setenv("PCBM_DEVICE", "cpu")
    settings = Settings()
    assert settings.workspace == tmp_path and settings.max_upload_bytes == 1234 and settings.device == "cpu"


def test_a_bad_value_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PCBM_DEVICE", "tpu")
    with pytest.raises(ValidationError):
        Settings(workspace=tmp_path)


class TestSecretKey:
    def test_generated_once_with_owner_only_permissions(self, tmp_path):
        settings = Settings(workspace=tmp_path)
        first = load_secret_key(settings)
        path = tmp_path / SECRET_KEY_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert len(first) >= 32
        assert load_secret_key(Settings(workspace=tmp_path)) == first

    def test_each_workspace_gets_its_own_key(self, tmp_path):
        assert load_secret_key(Settings(workspace=tmp_path / "a")) != load_secret_key(Settings(workspace=tmp_path / "b"))

    def test_an_explicit_key_is_used_and_nothing_is_written(self, tmp_path):
        key = "k" * 40
        assert load_secret_key(Settings(workspace=tmp_path, secret_key=key)) == key
        assert not (tmp_path / SECRET_KEY_FILE).exists()

    def test_production_refuses_to_start_without_a_key(self, tmp_path):
        with pytest.raises(ValidationError, match="PCBM_SECRET_KEY"):
            Settings(workspace=tmp_path, production=True)

    def test_production_with_a_key_starts(self, tmp_path):
        settings = Settings(workspace=tmp_path, production=True, secret_key="s" * 40)
        assert load_secret_key(settings) == "s" * 40

    def test_a_short_key_is_refused(self, tmp_path):
        with pytest.raises(ValidationError, match="at least 32"):
            Settings(workspace=tmp_path, secret_key="short")
