import pytest
import torch

from ml.concepts import ConceptBank
from ml.editing import Edit, add_text_concept, apply_edits
from ml.errors import ConfigError
from ml.head import SparseLinearHead
from ml.pcbm import PCBM, PCBMHybrid

IDENTITY = "ef" * 32
CLASSES = ["a", "b", "c"]


def model(seed=0, n=600, dim=10, concepts=8):
    gen = torch.Generator().manual_seed(seed)
    bank = ConceptBank([f"k{i}" for i in range(concepts)], torch.randn(concepts, dim, generator=gen),
                       backbone_identity=IDENTITY)
    emb = torch.randn(n, dim, generator=gen)
    labels = (bank.project(emb) @ torch.randn(concepts, 3, generator=gen)).argmax(1)
    return PCBM(bank, SparseLinearHead(lam=1e-3)).fit(emb, labels, CLASSES), emb, labels


def test_prune_changes_exactly_the_intended_weights():
    pcbm, *_ = model()
    before = pcbm.head.weight_.clone()
    new, records = apply_edits(pcbm, [Edit("prune", "k2", "b")])
    expected = before.clone()
    expected[1, 2] = 0.0
    assert torch.equal(new.head.weight_, expected)  # everything else bit-identical
    assert torch.equal(new.head.bias_, pcbm.head.bias_)
    assert records[0]["changes"] == ([{"class": "b", "concept": "k2", "old": float(before[1, 2]), "new": 0.0}]
                                     if before[1, 2] != 0 else [])
    every, _ = apply_edits(pcbm, [Edit("prune", "k5")])
    expected = before.clone()
    expected[:, 5] = 0.0
    assert torch.equal(every.head.weight_, expected)


def test_prune_normalize_keeps_each_row_l1():
    pcbm, *_ = model()
    column = int(pcbm.head.weight_.abs().sum(0).argmax())
    name = pcbm.bank.names[column]
    new, records = apply_edits(pcbm, [Edit("prune_normalize", name)])
    assert bool((new.head.weight_[:, column] == 0).all())
    torch.testing.assert_close(new.head.weight_.abs().sum(1), pcbm.head.weight_.abs().sum(1), rtol=1e-5, atol=0)
    zero_before = pcbm.head.weight_ == 0
    assert bool((new.head.weight_[zero_before] == 0).all())  # rescaling never creates weights
    changed = {(c["class"], c["concept"]) for c in records[0]["changes"]}
    assert (CLASSES[0], name) in changed or pcbm.head.weight_[0, column] == 0


def test_set_scale_and_records():
    pcbm, *_ = model()
    old = float(pcbm.head.weight_[2, 1])
    new, records = apply_edits(pcbm, [Edit("set", "k1", "c", 1.5, source="user"),
                                      {"op": "scale", "concept": "k1", "class_name": "c", "value": -2}])
    assert float(new.head.weight_[2, 1]) == -3.0
    assert records[0]["changes"] == [{"class": "c", "concept": "k1", "old": old, "new": 1.5}]
    assert records[0]["source"] == "user" and records[1]["changes"][0] == {
        "class": "c", "concept": "k1", "old": 1.5, "new": -3.0}


def test_edits_are_pure_and_restore_from_reference():
    pcbm, emb, labels = model()
    original = pcbm.head.weight_.clone()
    hybrid = PCBMHybrid(pcbm, epochs=1).fit(emb, labels)
    residual = hybrid.residual_weight_.clone()
    pruned, _ = apply_edits(hybrid, [Edit("prune", name) for name in pcbm.bank.names[:4]])
    assert torch.equal(pcbm.head.weight_, original) and torch.equal(hybrid.residual_weight_, residual)
    assert isinstance(pruned, PCBMHybrid) and torch.equal(pruned.residual_weight_, residual)
    assert bool((pruned.head.weight_[:, :4] == 0).all())
    restored, records = apply_edits(pruned, [Edit("restore", "k1"), Edit("restore", "k3", "a")], reference=hybrid)
    assert torch.equal(restored.head.weight_[:, 1], original[:, 1])
    assert float(restored.head.weight_[0, 3]) == float(original[0, 3])
    assert bool((restored.head.weight_[1:, 3] == 0).all())
    assert all(change["new"] == float(original[CLASSES.index(change["class"]), 1])
               for change in records[0]["changes"])


def test_unknown_names_and_bad_edits_raise_config_errors():
    pcbm, *_ = model()
    with pytest.raises(ConfigError, match="unknown concept 'zebra'"):
        apply_edits(pcbm, [Edit("prune", "zebra")])
    with pytest.raises(ConfigError, match="unknown class 'zebra'"):
        apply_edits(pcbm, [Edit("prune", "k1", "zebra")])
    with pytest.raises(ConfigError, match="reference"):
        apply_edits(pcbm, [Edit("restore", "k1")])
    with pytest.raises(ConfigError, match="unknown edit op 'delete'"):
        Edit("delete", "k1")
    with pytest.raises(ConfigError, match="needs a value"):
        Edit.from_dict({"op": "scale", "concept": "k1"})
    with pytest.raises(ConfigError, match="unknown edit fields: colour"):
        Edit.from_dict({"op": "prune", "concept": "k1", "colour": "red"})
    with pytest.raises(ConfigError, match="finite"):
        Edit("set", "k1", value=float("nan"))
    edit = Edit("scale", "k1", "a", 2, "tfti")
    assert Edit.from_dict(edit.to_dict()) == edit and edit.to_dict()["value"] == 2.0


class DirectionBackbone:
    identity = IDENTITY

    def __init__(self, direction):
        self.direction = direction

    def encode_texts(self, texts):
        return torch.stack([self.direction * 4 for _ in texts])


def test_add_text_concept_fits_only_the_new_column():
    pcbm, emb, _ = model()
    gen = torch.Generator().manual_seed(5)
    direction = torch.nn.functional.normalize(torch.randn(10, generator=gen), dim=0)
    labels = ((emb @ direction) > 0.3).long() + ((emb @ direction) > -0.3).long()  # 3 bands along it
    new, record = add_text_concept(pcbm, DirectionBackbone(direction), "a striped tail", emb, labels)
    assert new.bank.names[-1] == "striped tail" and len(new.bank) == len(pcbm.bank) + 1
    assert torch.equal(new.head.weight_[:, :-1], pcbm.head.weight_)
    assert torch.equal(new.head.bias_, pcbm.head.bias_)
    assert torch.equal(new.head.mean_[:-1], pcbm.head.mean_)
    column = new.head.weight_[:, -1]
    assert float(column[2]) > 0 > float(column[0])  # the band classes order along the direction
    assert record["op"] == "add_concept" and len(record["changes"]) == int((column != 0).sum())
    before = float((pcbm.predict(emb) == labels).float().mean())
    after = float((new.predict(emb) == labels).float().mean())
    assert after > before
    with pytest.raises(ConfigError, match="already has a concept"):
        add_text_concept(new, DirectionBackbone(direction), "striped tail", emb, labels)
