"""The whole demo build on a tiny world, through the same workflows a user runs."""

import json
import time

import pytest

from ml.demo.build import build_demo
from ml.demo.world import default_config
from ml.workspace import Workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_config():
    config = default_config()
    return config.replace(
        name="tiny", seed=3, counts={"train": 96, "val": 32, "test": 64, "test_shifted": 64}, concept_examples=10,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_config):
    root = tmp_path_factory.mktemp("demo")
    report = build_demo(root, tiny_config)
    return root, report


def test_report_has_every_documented_field(built):
    _, report = built
    splits = {"train", "val", "test", "test_shifted"}
    assert report["backbone"] == "demo" and report["n_concepts"] == 17
    for key in ("linear_probe", "pcbm", "pcbm_h"):
        assert set(report[key]) == splits
        assert all(0.0 <= v <= 1.0 for v in report[key].values())
    assert set(report["edit"]["before"]) == splits == set(report["edit"]["after"])
    assert report["edit"]["pruned"] == ["water background", "grass background", "sand background", "snow background"]
    assert 0.5 <= report["concepts"]["text_mean_auroc"] <= 1.0
    assert 0.5 <= report["concepts"]["cav_mean_heldout_acc"] <= 1.0
    assert {"world", "embed", "concepts_text", "concepts_cav", "train", "edit"} <= set(report["seconds"])


def test_effects_point_the_right_way(built):
    _, report = built
    before, after = report["edit"]["before"], report["edit"]["after"]
    # the training correlation is broken in test_shifted: the biased model does worse there,
    # and removing the background concepts cannot make it worse there
    assert report["pcbm"]["test_shifted"] < report["pcbm"]["test"]
    assert after["test_shifted"] >= before["test_shifted"]
    assert before == {k: report["pcbm"][k] for k in before}  # the preview starts from the trained model
    assert report["pcbm_h"]["test"] >= report["pcbm"]["test"] - 0.05


def test_second_build_is_cached_and_identical(built, tiny_config):
    root, report = built
    start = time.perf_counter()
    again = build_demo(root, tiny_config)
    assert again["cached"] is True and time.perf_counter() - start < 30
    assert {k: v for k, v in again.items() if k != "cached"} == {k: v for k, v in report.items() if k != "cached"}
    saved = json.loads((root / "demo_report.json").read_text())
    assert saved["pcbm"] == report["pcbm"]


def test_workspace_is_loadable_by_the_generic_loaders(built):
    root, _ = built
    workspace = Workspace.open(root)
    assert set(workspace.models) >= {"pcbm", "pcbm_h"} and workspace.default_model == "pcbm"
    assert set(workspace.banks) == {"text", "cav"} and workspace.backbone == "demo"
