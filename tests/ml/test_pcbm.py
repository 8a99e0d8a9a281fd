import pickle

import pytest
import torch

from ml.concepts import ConceptBank
from ml.errors import DataError, NotFittedError, ShapeError
from ml.head import SparseLinearHead
from ml.pcbm import PCBM, PCBMHybrid, load_model

CLASSES = ["cat", "dog", "fox"]


def world(seed=0, n=900, dim=16, concepts=6):
    """Embeddings whose labels depend on the bank's directions only."""
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(concepts, dim, generator=gen)
    bank = ConceptBank([f"k{i}" for i in range(concepts)], vectors, torch.randn(concepts, generator=gen),
                       backbone_identity="cd" * 32)
    emb = torch.randn(n, dim, generator=gen)
    truth = torch.randn(3, concepts, generator=gen) * 2
    labels = (bank.project(emb) @ truth.T).argmax(1)
    return bank, emb, labels


def fitted(seed=0):
    bank, emb, labels = world(seed)
    return PCBM(bank, SparseLinearHead(lam=1e-3)).fit(emb, labels, CLASSES), emb, labels


def test_fit_predict_and_explain_add_up():
    model, emb, labels = fitted()
    assert model.classes_ == CLASSES
    assert float((model.predict(emb) == labels).float().mean()) > 0.9
    torch.testing.assert_close(model.predict_proba(emb).sum(1), torch.ones(len(emb)))
    logits = model.decision_function(emb[:5])
    for row, item in enumerate(model.explain(emb[:5])):
        assert item["class_index"] == int(logits[row].argmax()) and item["class_name"] in CLASSES
        total = item["bias"] + sum(c["contribution"] for c in item["contributions"])
        assert total == pytest.approx(float(logits[row, item["class_index"]]), abs=1e-4)
        sizes = [abs(c["contribution"]) for c in item["contributions"]]
        assert sizes == sorted(sizes, reverse=True)
        assert all(c["concept"] == model.bank.names[c["index"]] for c in item["contributions"])
    forced = model.explain(emb[:3], class_index=2, top=2)
    assert [item["class_index"] for item in forced] == [2, 2, 2]
    assert all(len(item["contributions"]) <= 2 for item in forced)


def test_hybrid_beats_pcbm_when_concepts_are_insufficient():
    gen = torch.Generator().manual_seed(0)
    dim = 12
    bank = ConceptBank([f"k{i}" for i in range(4)], torch.eye(dim)[:4])  # spans dims 0-3 only
    emb = torch.randn(1200, dim, generator=gen)
    labels = (emb[:, 9] > 0).long()  # depends on a direction the bank does not span
    pcbm = PCBM(bank).fit(emb[:800], labels[:800])
    head_before = pcbm.head.weight_.clone()
    hybrid = PCBMHybrid(pcbm, epochs=10, seed=3).fit(emb[:800], labels[:800])
    acc_pcbm = float((pcbm.predict(emb[800:]) == labels[800:]).float().mean())
    acc_hybrid = float((hybrid.predict(emb[800:]) == labels[800:]).float().mean())
    assert acc_pcbm < 0.65 and acc_hybrid > 0.9 and acc_hybrid >= acc_pcbm
    assert torch.equal(pcbm.head.weight_, head_before)  # only the residual was trained
    again = PCBMHybrid(pcbm, epochs=10, seed=3).fit(emb[:800], labels[:800])
    assert torch.equal(again.residual_weight_, hybrid.residual_weight_)  # seeded


def test_pcbm_save_load_is_bit_exact(tmp_path):
    model, emb, _ = fitted()
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is PCBM and loaded.classes_ == CLASSES
    assert torch.equal(loaded.bank.vectors, model.bank.vectors) and loaded.bank.info == model.bank.info
    for name in ("weight_", "bias_", "mean_", "scale_"):
        assert torch.equal(getattr(loaded.head, name), getattr(model.head, name))
    assert torch.equal(loaded.decision_function(emb), model.decision_function(emb))
    assert isinstance(PCBM.load(tmp_path / "m"), PCBM)


def test_hybrid_save_load_is_bit_exact(tmp_path):
    model, emb, labels = fitted()
    hybrid = PCBMHybrid(model, epochs=2).fit(emb, labels)
    path = hybrid.save(tmp_path / "h")
    assert path.name == "model.safetensors"
    loaded = load_model(tmp_path / "h")
    assert type(loaded) is PCBMHybrid and loaded.epochs == 2
    assert torch.equal(loaded.residual_weight_, hybrid.residual_weight_)
    assert torch.equal(loaded.decision_function(emb), hybrid.decision_function(emb))
    with pytest.raises(DataError, match="not a PCBM"):
        PCBM.load(tmp_path / "h")


def test_hostile_pickle_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors").write_bytes(pickle.dumps(Hostile()))
    with pytest.raises(DataError):
        load_model(tmp_path / "m")
    assert not marker.exists()


def test_errors():
    bank, emb, labels = world()
    with pytest.raises(NotFittedError):
        PCBM(bank).predict(emb)
    with pytest.raises(NotFittedError):
        PCBMHybrid(PCBM(bank)).decision_function(emb)
    with pytest.raises(DataError, match="no training examples: fox"):
        PCBM(bank).fit(emb, labels.clamp(max=1), CLASSES)
    with pytest.raises(ShapeError, match="dimension 5 but the concept bank has dimension 16"):
        PCBM(bank).fit(torch.zeros(10, 5), torch.zeros(10, dtype=torch.long))
    nan = emb.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        PCBM(bank).fit(nan, labels)
    with pytest.raises(DataError):
        load_model("/nonexistent/model")
