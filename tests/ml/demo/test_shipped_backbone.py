"""The shipped demo backbone supports the demo: every check of ml.demo.evaluate_backbone holds.

This is the acceptance test of the checkpoint in ml/demo/checkpoint/ (about a minute on
2 cores): retraining it, or changing the renderer, must keep these numbers.
"""

from pathlib import Path

import pytest

from ml.demo.evaluate_backbone import TARGETS, evaluate
from ml.demo.world import default_config

pytestmark = pytest.mark.slow

CHECKPOINT = Path(__file__).resolve().parents[3] / "ml" / "demo" / "checkpoint"


def test_every_demo_check_holds_on_the_default_world():
    result = evaluate(CHECKPOINT, default_config())
    failed = {name: ok for name, ok in result["checks"].items() if not ok}
    assert failed == {}, f"checks failed: {sorted(failed)}"
    assert set(result["checks"]) == set(TARGETS)
    pcbm = result["pcbm"]
    assert pcbm["gain_shifted"] >= TARGETS["prune_gain"] and pcbm["cost_test"] <= TARGETS["prune_cost"]
    assert result["mean_auroc"] >= TARGETS["mean_auroc"]
