import hashlib
import pickle

import numpy as np
import pytest
import torch

import ml.concepts as concepts
from ml.concepts import ConceptBank, clean_phrase, learn_cav_bank, text_concept_bank
from ml.errors import ConfigError, DataError, PCBMError, ShapeError

IDENTITY = "ab" * 32


class FakeTextBackbone:
    """Deterministic text encoder: a text's vector is seeded by its hash (or fixed by hand)."""

    def __init__(self, dim=16, fixed=None, identity=IDENTITY):
        self.dim, self.fixed, self.identity = dim, fixed or {}, identity
        self.calls = []

    def encode_texts(self, texts):
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            if text in self.fixed:
                rows.append(self.fixed[text])
                continue
            seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
            rows.append(torch.randn(self.dim, generator=torch.Generator().manual_seed(seed)) * 3)
        return torch.stack(rows)


def random_bank(count=6, dim=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ConceptBank(
        names=[f"concept {i}" for i in range(count)],
        vectors=torch.randn(count, dim, generator=gen) * 2,
        intercepts=torch.randn(count, generator=gen),
        sources=["cav"] * count,
        info=[{"heldout_acc": 0.5 + i / 100, "C": 0.1, "near_chance": False} for i in range(count)],
        backbone_identity=IDENTITY,
    )


def test_project_equals_direct_numpy_computation():
    bank = random_bank()
    emb = torch.randn(40, 10, generator=torch.Generator().manual_seed(1)) * 5
    v, b, e = bank.vectors.double().numpy(), bank.intercepts.double().numpy(), emb.double().numpy()
    expected = (e @ v.T + b) / np.linalg.norm(v, axis=1)
    got = bank.project(emb)
    assert got.dtype == torch.float32 and got.shape == (40, 6)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bank.norms.numpy(), np.linalg.norm(v, axis=1), rtol=1e-6)


def test_project_rejects_wrong_dimension_naming_both():
    with pytest.raises(ShapeError, match=r"dimension 7.*dimension 10"):
        random_bank().project(torch.zeros(3, 7))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_project_rejects_nan_and_inf(bad):
    emb = torch.zeros(4, 10)
    emb[2, 3] = bad
    with pytest.raises(DataError, match="NaN or Inf"):
        random_bank().project(emb)


def test_empty_and_duplicate_concepts_are_errors():
    with pytest.raises(PCBMError, match="empty"):
        ConceptBank([], torch.zeros(0, 4))
    with pytest.raises(ConfigError, match="duplicated: a"):
        ConceptBank(["a", "b", "a"], torch.ones(3, 4))
    with pytest.raises(DataError, match="zero vector for: b"):
        ConceptBank(["a", "b"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_save_load_is_bit_exact(tmp_path):
    bank = random_bank()
    bank.save(tmp_path / "bank")
    loaded = ConceptBank.load(tmp_path / "bank")
    assert torch.equal(loaded.vectors, bank.vectors) and torch.equal(loaded.intercepts, bank.intercepts)
    assert (loaded.names, loaded.sources, loaded.info, loaded.backbone_identity) == (
        bank.names, bank.sources, bank.info, bank.backbone_identity)
    emb = torch.randn(5, 10)
    assert torch.equal(loaded.project(emb), bank.project(emb))


def test_load_refuses_a_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    target = tmp_path / "bank"
    target.mkdir()
    (target / "bank.safetensors").write_bytes(pickle.dumps(Hostile()))
    with pytest.raises(DataError):
        ConceptBank.load(target)
    assert not marker.exists()


def test_subset_and_concat():
    bank = random_bank()
    sub = bank.subset(["concept 3", "concept 1"])
    assert sub.names == ["concept 3", "concept 1"]
    assert torch.equal(sub.vectors[0], bank.vectors[3]) and sub.info[1] == bank.info[1]
    with pytest.raises(ConfigError, match="'nope'"):
        bank.subset(["nope"])
    joined = sub.concat(bank.subset(["concept 0"]))
    assert joined.names == ["concept 3", "concept 1", "concept 0"]
    with pytest.raises(ConfigError, match="duplicated"):
        sub.concat(sub)
    with pytest.raises(ShapeError):
        bank.concat(random_bank(dim=3).subset(["concept 5"]))


@pytest.mark.parametrize("raw,clean", [
    ("banana", "banana"), ("a banana", "banana"), ("an apple pie", "apple pie"), ("The sea", "sea"),
    ("a", "a"), ("has_wings", "has wings"), ("  striped   tail ", "striped tail"), ("cabana", "cabana"),
])
def test_clean_phrase_drops_only_a_leading_article(raw, clean):
    assert clean_phrase(raw) == clean


def test_text_bank_averages_unit_template_embeddings():
    backbone = FakeTextBackbone()
    templates = ["a photo of {}", "{}", "a drawing of {}"]
    bank = text_concept_bank(backbone, ["a banana", "stripes"], templates)
    assert bank.names == ["banana", "stripes"] and bank.sources == ["text", "text"]
    assert bank.backbone_identity == IDENTITY and torch.equal(bank.intercepts, torch.zeros(2))
    for row, phrase in enumerate(["banana", "stripes"]):
        enc = backbone.encode_texts([t.format(phrase) for t in templates])
        expected = torch.nn.functional.normalize(torch.nn.functional.normalize(enc, dim=1).mean(0), dim=0)
        torch.testing.assert_close(bank.vectors[row], expected)
    torch.testing.assert_close(bank.norms, torch.ones(2))
    assert "a photo of banana" in backbone.calls[0]


def test_text_bank_errors():
    with pytest.raises(ConfigError, match="placeholder"):
        text_concept_bank(FakeTextBackbone(), ["x"], ["no slot"])
    with pytest.raises(DataError, match="empty"):
        text_concept_bank(FakeTextBackbone(), [])
    with pytest.raises(ConfigError, match="duplicated: dog"):
        text_concept_bank(FakeTextBackbone(), ["dog", "a dog"])


def _planted(seed=0, dim=16, count=4, n=160, shift=2.0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(dim, generator=gen)
    pos, neg, dirs = {}, {}, {}
    for i in range(count):
        u = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0)
        dirs[f"c{i}"] = u
        pos[f"c{i}"] = base + 0.4 * torch.randn(n, dim, generator=gen) + shift * u
        neg[f"c{i}"] = base + 0.4 * torch.randn(n, dim, generator=gen)
    return pos, neg, dirs, base, gen


def test_cavs_recover_planted_directions_and_flag_noise():
    pos, neg, dirs, base, gen = _planted()
    pos["noise"] = base + 0.4 * torch.randn(100, 16, generator=gen)
    neg["noise"] = base + 0.4 * torch.randn(100, 16, generator=gen)
    bank = learn_cav_bank(pos, neg, backbone_identity=IDENTITY)
    assert bank.sources == ["cav"] * 5 and bank.backbone_identity == IDENTITY
    for name, u in dirs.items():
        row = bank.names.index(name)
        assert float(bank.vectors[row] @ u / bank.norms[row]) > 0.9
        info = bank.info[row]
        assert info["heldout_acc"] > 0.95 and not info["near_chance"]
        by_c = dict((c, a) for c, a in info["heldout_acc_by_C"])
        assert info["C"] in by_c and by_c[info["C"]] == max(by_c.values())
        assert info["n_train"] == 160 and info["n_heldout"] == 160
    assert bank.info[bank.names.index("noise")]["near_chance"]
    # positives score higher than negatives: the projection is a signed distance
    assert (bank.project(pos["c0"])[:, 0].mean() > 0) and (bank.project(neg["c0"])[:, 0].mean() < 0)


def test_cav_picks_a_larger_c_when_the_centroid_direction_is_poor():
    # a noisy direction shared by both classes: small C (~ mean difference) fails, large C finds the margin
    gen = torch.Generator().manual_seed(0)

    def sample(n, shift):
        x = 0.1 * torch.randn(n, 16, generator=gen)
        big = 3.0 * torch.randn(n, generator=gen)
        x[:, 0] += shift + big
        x[:, 1] += big
        return x

    bank = learn_cav_bank({"aniso": sample(200, 0.6)}, {"aniso": sample(200, 0.0)}, c_grid=(0.001, 0.01, 0.1))
    info = bank.info[0]
    by_c = dict((c, a) for c, a in info["heldout_acc_by_C"])
    assert info["C"] >= 0.1 and info["heldout_acc"] > 0.9 and by_c[0.001] < 0.7


def test_cav_matches_sklearn_svc_for_every_c():
    svm = pytest.importorskip("sklearn.svm")
    pos, neg, _, _, _ = _planted(seed=3, dim=24, count=1, n=60, shift=0.8)
    name = "c0"
    gen = torch.Generator().manual_seed(concepts._split_seed(0, name))
    p_train, _ = concepts._split(pos[name], 0.5, gen)
    n_train, _ = concepts._split(neg[name], 0.5, gen)
    grid = [0.001, 0.01, 0.1, 1.0, 10.0]
    weights, biases, converged = concepts._fit_grid(concepts._pad([(p_train, n_train)], 24), grid)
    x = torch.cat([p_train, n_train]).double().numpy()
    y = np.r_[np.ones(len(p_train)), -np.ones(len(n_train))]
    for g, c in enumerate(grid):
        ref = svm.SVC(kernel="linear", C=c).fit(x, y)
        w = ref.coef_.ravel()
        ours = weights[0, g].double().numpy()
        assert np.dot(w, ours) / np.linalg.norm(w) / np.linalg.norm(ours) > 0.999
        np.testing.assert_allclose(np.linalg.norm(ours), np.linalg.norm(w), rtol=2e-2)
        assert abs(float(biases[0, g]) - ref.intercept_[0]) < 2e-2 * max(1.0, abs(ref.intercept_[0]))
    assert bool(converged.all())


def test_cav_is_seeded_and_split_per_concept():
    pos, neg, _, _, _ = _planted(count=2, n=40)
    a = learn_cav_bank(pos, neg, seed=1)
    b = learn_cav_bank(pos, neg, seed=1)
    assert torch.equal(a.vectors, b.vectors) and a.info == b.info
    alone = learn_cav_bank({"c1": pos["c1"]}, {"c1": neg["c1"]}, seed=1)
    torch.testing.assert_close(alone.vectors[0], a.vectors[1], rtol=1e-5, atol=1e-6)
    assert not torch.equal(learn_cav_bank(pos, neg, seed=2).vectors, a.vectors)


def test_cav_errors_name_the_concept():
    pos, neg, _, _, _ = _planted(count=2, n=10)
    with pytest.raises(DataError, match="'c1' has 1 positives"):
        learn_cav_bank({**pos, "c1": pos["c1"][:1]}, neg)
    with pytest.raises(ConfigError, match="unmatched: c1"):
        learn_cav_bank(pos, {"c0": neg["c0"]})
    with pytest.raises(DataError, match="empty"):
        learn_cav_bank({}, {})
    bad = neg["c1"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match="'c1'.*NaN"):
        learn_cav_bank(pos, {**neg, "c1": bad})
    with pytest.raises(ShapeError, match="'c1'"):
        learn_cav_bank(pos, {**neg, "c1": torch.zeros(5, 3)})
    with pytest.raises(ConfigError, match="c_grid"):
        learn_cav_bank(pos, neg, c_grid=[0.0])
