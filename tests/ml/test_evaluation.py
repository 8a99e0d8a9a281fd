from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml.concepts import ConceptBank
from ml.editing import OPS, Edit, apply_edits
from ml.errors import ConfigError
from ml.evaluation import EvalCache, classification_report, preview_edits
from ml.head import SparseLinearHead
from ml.pcbm import PCBM, PCBMHybrid

CLASSES = ["a", "b", "c", "d"]
CONCEPTS = 12


def build(seed=0, n=500, dim=14):
    gen = torch.Generator().manual_seed(seed)
    bank = ConceptBank([f"k{i}" for i in range(CONCEPTS)], torch.randn(CONCEPTS, dim, generator=gen),
                       torch.randn(CONCEPTS, generator=gen))
    emb = torch.randn(n, dim, generator=gen)
    labels = (bank.project(emb) @ torch.randn(CONCEPTS, 4, generator=gen)).argmax(1)
    groups = torch.randint(0, 3, (n,), generator=gen)
    model = PCBM(bank, SparseLinearHead(lam=2e-3)).fit(emb, labels, CLASSES)
    return model, emb, labels, groups


MODEL, EMB, LABELS, GROUPS = build()
CACHE = EvalCache.build(MODEL, (EMB, LABELS, GROUPS), group_names=["x", "y", "z"])

edit_strategy = st.builds(
    lambda op, concept, cls, value: Edit(op, f"k{concept}", cls, value if op in ("set", "scale") else None),
    st.sampled_from(OPS), st.integers(0, CONCEPTS - 1), st.one_of(st.none(), st.sampled_from(CLASSES)),
    st.floats(-3, 3, allow_nan=False),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(edit_strategy, min_size=1, max_size=6))
def test_incremental_preview_equals_full_recompute(edits):
    edited, _ = apply_edits(MODEL, edits, reference=MODEL)
    full = edited.decision_function(EMB)
    fast, cols = CACHE.logits_for(edited)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    changed = (edited.head.weight_ != MODEL.head.weight_).any(0).nonzero().flatten().tolist()
    assert cols == changed
    preview = preview_edits(CACHE, MODEL, edited)
    # compare with a report from the full logits (predictions agree up to exact ties)
    expected = classification_report(full, LABELS, GROUPS, CLASSES, ["x", "y", "z"])
    assert preview["after"]["accuracy"] == pytest.approx(expected["accuracy"], abs=1.5 / len(LABELS))
    assert preview["changed_concepts"] == [f"k{c}" for c in changed]
    flips = preview["flips"]
    delta = (flips["newly_correct"] - flips["newly_wrong"]) / len(LABELS)
    assert preview["delta"]["accuracy"] == pytest.approx(delta, abs=1e-6)


def test_preview_reports_before_after_groups_and_flips():
    column = int(MODEL.head.weight_.abs().sum(0).argmax())
    edited, _ = apply_edits(MODEL, [Edit("prune", f"k{column}")])
    preview = preview_edits(CACHE, MODEL, edited, max_flips=3)
    before = classification_report(MODEL.decision_function(EMB), LABELS, GROUPS, CLASSES, ["x", "y", "z"])
    assert preview["before"] == before
    assert set(preview["after"]["per_group"]) == {"x", "y", "z"} and set(preview["after"]["per_class"]) == set(CLASSES)
    worst = min(preview["after"]["per_group"].values())
    assert preview["after"]["worst_group"]["accuracy"] == worst
    flips = preview["flips"]
    old_pred = MODEL.predict(EMB)
    new_pred = edited.predict(EMB)
    assert flips["count"] == int((old_pred != new_pred).sum()) > 3
    assert len(flips["examples"]) == 3 and flips["truncated"]
    first = flips["examples"][0]
    assert first["old_pred"] == int(old_pred[first["index"]]) and first["label"] == int(LABELS[first["index"]])
    assert preview["changed_concepts"] == [f"k{column}"]


def test_unchanged_model_previews_no_change():
    preview = preview_edits(CACHE, MODEL, MODEL.copy())
    assert preview["delta"]["accuracy"] == 0 and preview["flips"]["count"] == 0 and preview["changed_concepts"] == []


def test_cache_works_for_hybrids_and_embedded_splits():
    model, emb, labels, _ = build(seed=1, n=300)
    hybrid = PCBMHybrid(model, epochs=1).fit(emb, labels)

    @dataclass
    class Split:
        embeddings: torch.Tensor
        labels: torch.Tensor
        groups: list

    split = Split(emb, labels, ["sea", None, "land"] * 100)
    cache = EvalCache.build(hybrid, split)
    assert cache.group_names == ["(none)", "land", "sea"] and cache.groups.tolist()[:3] == [2, 0, 1]
    edited, _ = apply_edits(hybrid, [Edit("scale", "k3", value=3.0), Edit("set", "k4", "b", 1.0)])
    torch.testing.assert_close(cache.logits_for(edited)[0], edited.decision_function(emb), rtol=1e-5, atol=1e-5)


def test_incompatible_head_needs_a_new_cache():
    other, *_ = build(seed=2)
    with pytest.raises(ConfigError, match="rebuild"):
        preview_edits(CACHE, MODEL, other)
    wider = SparseLinearHead().fit(torch.randn(40, CONCEPTS + 1), torch.arange(40) % 4)
    with pytest.raises(ConfigError, match="rebuild the cache"):
        CACHE.logits_for(wider)


def test_classification_report_handles_empty_classes_and_no_groups():
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [2.0, 0, 0], [0, 2.0, 0]])
    labels = torch.tensor([0, 1, 1, 1])
    report = classification_report(logits, labels, class_names=["p", "q", "r"])
    assert report["accuracy"] == 0.75 and report["per_class"] == {"p": 1.0, "q": 2 / 3, "r": None}
    assert report["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert report["per_group"] == {} and report["worst_group"] is None
