import json

import pytest

from ml.errors import ConfigError, DataError
from ml.workspace import Workspace, check_name


def test_register_and_reopen_round_trip(tmp_path):
    ws = Workspace.open(tmp_path / "ws", create=True)
    target = ws.new_path("banks", "text")
    target.mkdir(parents=True)
    ws.register("banks", "text", target)
    reopened = Workspace.open(tmp_path / "ws")
    assert reopened.banks == {"text": "banks/text"}
    assert reopened.path_for("banks", "text") == target.resolve()


def test_unknown_artifact_names_the_known_ones(tmp_path):
    ws = Workspace.open(tmp_path, create=True)
    ws.register("models", "pcbm", ws.new_path("models", "pcbm"))
    with pytest.raises(ConfigError, match=r"unknown model 'nope'.*known: pcbm"):
        ws.path_for("models", "nope")


def test_missing_workspace_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no workspace at"):
        Workspace.open(tmp_path / "absent")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65, "a..b", "a\\b"])
def test_unsafe_names_are_refused(name):
    with pytest.raises(ConfigError, match="invalid"):
        check_name(name)


def test_a_manifest_pointing_outside_is_refused(tmp_path):
    ws = Workspace.open(tmp_path / "ws", create=True)
    manifest = json.loads((ws.root / "workspace.json").read_text())
    manifest["models"] = {"evil": "../../etc"}
    (ws.root / "workspace.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not allowed|leaves"):
        Workspace.open(ws.root).path_for("models", "evil")


def test_unknown_manifest_keys_survive_a_save(tmp_path):
    ws = Workspace.open(tmp_path, create=True)
    data = json.loads((tmp_path / "workspace.json").read_text())
    data["demo"] = {"config_hash": "abc"}
    (tmp_path / "workspace.json").write_text(json.dumps(data))
    ws = Workspace.open(tmp_path)
    ws.register("banks", "b", ws.new_path("banks", "b"))
    assert json.loads((tmp_path / "workspace.json").read_text())["demo"] == {"config_hash": "abc"}
