"""Suggested edits: each method's choice on a constructed case with a known answer, the
locality of every proposal, and previews that equal the applied edit recomputed in full."""

import json

import pytest
import torch
from typer.testing import CliRunner

from ml import suggest as sg
from ml.cli import cli
from ml.concepts import ConceptBank
from ml.editing import add_text_concept, apply_edits
from ml.embed import EmbeddedDataset
from ml.errors import ConfigError, DataError
from ml.evaluation import EvalCache, classification_report, preview_edits
from ml.head import SparseLinearHead
from ml.pcbm import PCBM
from ml.workspace import Workspace

CLASSES = ["circle", "square", "triangle"]
GROUPS = ["water", "grass", "sand"]
CONCEPTS = ["circle", "square", "triangle", "water", "grass", "sand", "red"]
DIM = 10


def fixed_model(weight, classes=CLASSES, names=CONCEPTS, source=None):
    """A PCBM with the given head on unit concept vectors e_i, centred on ``source`` (embeddings)."""
    weight = torch.as_tensor(weight, dtype=torch.float32)
    head = SparseLinearHead()
    head.weight_, head.bias_ = weight.clone(), torch.zeros(weight.shape[0])
    mean = source[:, : weight.shape[1]].mean(0) if source is not None else torch.zeros(weight.shape[1])
    head.mean_, head.scale_ = mean, torch.ones(weight.shape[1])
    head.n_classes_, head.n_iter_, head.converged_ = weight.shape[0], 0, True
    return PCBM(ConceptBank(list(names), torch.eye(DIM)[: len(names)]), head, list(classes))


def images(labels, backgrounds, shape=2.0, background=2.0, noise=0.3, seed=0):
    """Embeddings whose coordinate of the class's shape and of the background are raised."""
    gen = torch.Generator().manual_seed(seed)
    labels, backgrounds = torch.as_tensor(labels), torch.as_tensor(backgrounds)
    e = noise * torch.randn(len(labels), DIM, generator=gen)
    e[torch.arange(len(labels)), labels] += shape
    e[torch.arange(len(labels)), 3 + backgrounds] += background
    return e


def world(seed=0, n=300, correlation=0.95, shifted_shape=2.0):
    """Class = shape; backgrounds paired with classes (circle-water, ...) except in test_shifted."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for split, count in (("train", n), ("test", n), ("test_shifted", n)):
        y = torch.randint(0, 3, (count,), generator=gen)
        if split == "test_shifted":
            bg = (y + torch.randint(1, 3, (count,), generator=gen)) % 3
        else:
            keep = torch.rand(count, generator=gen) < correlation
            bg = torch.where(keep, y, torch.randint(0, 3, (count,), generator=gen))
        shape = shifted_shape if split == "test_shifted" else 2.0
        parts.append((split, images(y, bg, shape=shape, noise=1.0, seed=seed + len(parts)), y, bg))
    emb = torch.cat([p[1] for p in parts])
    return EmbeddedDataset(emb, [f"{p[0]}/{i}.png" for p in parts for i in range(len(p[2]))],
                           torch.cat([p[2] for p in parts]), list(CLASSES), [p[0] for p in parts for _ in p[2]],
                           [GROUPS[int(b)] for p in parts for b in p[3]], "", "/data")


@pytest.fixture(scope="module")
def fitted():
    data = world()
    train = data.split("train")
    model = PCBM(ConceptBank(list(CONCEPTS), torch.eye(DIM)[: len(CONCEPTS)]), SparseLinearHead(lam=3e-3),
                 CLASSES).fit(train.embeddings, train.labels)
    return model, data


def changed_cells(before, after):
    diff = (before.head.weight_ != after.head.weight_).nonzero().tolist()
    return {(before.classes_[k], before.bank.names[c]) for k, c in diff}


def stated_cells(model, proposal):
    cells = set()
    for edit in proposal.edits:
        rows = model.classes_ if edit.class_name is None else [edit.class_name]
        cells |= {(r, edit.concept) for r in rows}
    return cells


# -- TF-TTI ------------------------------------------------------------------------------------

# circle uses its shape and water; square its shape and grass; triangle its shape only.
PLANTED = [[1.0, 0, 0, 2.0, 0, 0, 0],
           [0, 1.0, 0, 0, 2.0, 0, 0],
           [0, 0, 1.0, 0, 0, 0, 0]]


def test_tfti_masks_the_misactivated_concepts_and_amplifies_the_weakened_shape():
    source = (images([0, 1, 2] * 20, [0, 1, 2] * 20, seed=1), torch.tensor([0, 1, 2] * 20))
    model = fixed_model(PLANTED, source=source[0])
    # target: circles on grass, squares on water, triangles on sand; the circle shape is
    # drawn weaker there (1.5 instead of 2.0): under-activated but still discriminative
    labels = torch.tensor([0, 1, 2] * 4)
    target = images(labels, torch.tensor([1, 0, 2] * 4), seed=2)
    target[labels == 0, 0] -= 0.5
    proposals = sg.tfti_proposals(model, source, (target, labels))
    masks = [p for p in proposals if p.kind == "mask"]
    amplify = [p for p in proposals if p.kind == "amplify"]
    assert {p.concepts[0] for p in masks} == {"water", "grass"}
    assert all(e.op == "prune" and e.source == "tfti" for p in masks for e in p.edits)
    water = next(p for p in masks if p.concepts == ["water"])
    assert water.evidence["raises_wrong_class"]["circle"] == 4  # the four squares on water
    assert water.evidence["lowers_true_class"]["circle"] == 4  # the four circles off water
    assert water.evidence["shots"]["margin_up"] > water.evidence["shots"]["margin_down"]
    assert [(p.edits[0].concept, p.edits[0].class_name) for p in amplify] == [("circle", "circle")]
    edit = amplify[0].edits[0]
    assert edit.op == "scale" and edit.source == "tfti"
    ratio = amplify[0].evidence["source_mean"] / amplify[0].evidence["target_mean"]
    assert edit.value == pytest.approx(min(max(ratio, 1.0), 3.0)) and 1.3 < edit.value < 2.5
    assert amplify[0].evidence["images_under_activated"] == 4


def test_tfti_leaves_a_model_alone_when_the_target_looks_like_the_source():
    source = (images([0, 1, 2] * 20, [0, 1, 2] * 20, seed=1), torch.tensor([0, 1, 2] * 20))
    model = fixed_model(PLANTED, source=source[0])
    target = (images([0, 1, 2] * 4, [0, 1, 2] * 4, seed=3), torch.tensor([0, 1, 2] * 4))
    assert sg.tfti_proposals(model, source, target) == []


def test_tfti_scope_all_and_bad_arguments():
    source = (images([0, 1, 2] * 10, [0, 1, 2] * 10, seed=1), torch.tensor([0, 1, 2] * 10))
    model = fixed_model(PLANTED, source=source[0])
    target = (images([0, 1, 2] * 4, [1, 0, 2] * 4, seed=2), torch.tensor([0, 1, 2] * 4))
    proposals = sg.tfti_proposals(model, source, target, scope="all", max_amplify=0)
    assert proposals and all(e.class_name is None for p in proposals for e in p.edits)
    assert len(sg.tfti_proposals(model, source, target, max_mask=1, max_amplify=0)) == 1
    with pytest.raises(ConfigError):
        sg.tfti_proposals(model, source, target, scope="some")
    with pytest.raises(ConfigError):
        sg.tfti_proposals(model, source, target, scale_range=(0.5, 2.0))


def test_tfti_source_budget_refuses_edits_that_cost_too_much_in_distribution(fitted):
    model, data = fitted
    shifted, train = data.split("test_shifted"), data.split("train")
    shots = sg.scored(model, shifted).rows(sg.sample_shots(shifted.labels, 4, seed=0))
    free = sg.tfti_proposals(model, train, shots, max_source_drop=None)
    budget = 0.01
    kept = sg.tfti_proposals(model, train, shots, max_source_drop=budget)
    assert len(kept) < len(free)
    before = (model.predict(train.embeddings) == train.labels).float().mean()
    edited, _ = apply_edits(model, [e for p in kept for e in p.edits])
    assert before - (edited.predict(train.embeddings) == train.labels).float().mean() <= budget


def test_sample_shots_is_seeded_and_per_class():
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 2)
    rows = sg.sample_shots(labels, 4, seed=7)
    assert torch.equal(rows, sg.sample_shots(labels, 4, seed=7))
    assert not torch.equal(rows, sg.sample_shots(labels, 4, seed=8))
    assert torch.bincount(labels[rows]).tolist() == [4, 4, 2]
    with pytest.raises(ConfigError):
        sg.sample_shots(labels, 0)


# -- greedy ------------------------------------------------------------------------------------

def test_greedy_first_prunes_the_planted_spurious_concept_and_stops_when_nothing_helps():
    model = fixed_model(PLANTED)
    labels = torch.tensor([0, 1, 2] * 10)
    shifted = images(labels, torch.tensor([1, 0, 2] * 10), seed=4)  # backgrounds swapped
    cache = EvalCache.build(model, (shifted, labels))
    steps = sg.greedy_prunes(model, cache, k=5)
    assert {s["concept"] for s in steps[:2]} == {"water", "grass"}
    assert steps[-1]["metric"] == 1.0 and len(steps) == 2  # nothing left to gain: it stops
    assert all(s["edit"].source == "greedy" and s["class_name"] is None for s in steps)
    metrics = [s["before"] for s in steps] + [steps[-1]["metric"]]
    assert metrics == sorted(metrics) and metrics[0] < metrics[-1]
    # the metric after each step is what the preview of the prefix shows
    for j, step in enumerate(steps, 1):
        edited, _ = apply_edits(model, [s["edit"] for s in steps[:j]])
        assert preview_edits(cache, model, edited)["after"]["accuracy"] == step["accuracy"] == step["metric"]


def test_greedy_worst_group_per_class_and_candidates():
    model = fixed_model(PLANTED)
    labels = torch.tensor([0, 1, 2] * 10)
    backgrounds = torch.tensor([1, 0, 2] * 10)
    cache = EvalCache.build(model, (images(labels, backgrounds, seed=5), labels, backgrounds),
                            group_names=GROUPS)
    steps = sg.greedy_prunes(model, cache, k=3, metric="worst_group", per_class=True)
    assert {(s["concept"], s["class_name"]) for s in steps} <= {("water", None), ("water", "circle"),
                                                                ("grass", None), ("grass", "square")}
    assert steps[-1]["worst_group_accuracy"] == 1.0
    only = sg.greedy_prunes(model, cache, k=3, candidates=["grass", ("red", None)])
    assert [s["concept"] for s in only] == ["grass"]
    with pytest.raises(ConfigError):
        sg.greedy_prunes(model, EvalCache.build(model, (images(labels, backgrounds), labels)), metric="worst_group")
    with pytest.raises(ConfigError):
        sg.greedy_prunes(model, cache, metric="f1")
    with pytest.raises(ConfigError):
        sg.greedy_prunes(model, cache, candidates=["nope"])


# -- spurious ranking --------------------------------------------------------------------------

def test_spurious_ranking_puts_the_planted_concept_first():
    # within every class the "water" score follows the group; shapes do not. "red" varies
    # with the group as much as water but has no weight, so the model does not use it.
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(40)
    groups = torch.arange(2).repeat(60)
    e = 0.3 * torch.randn(120, DIM, generator=gen)
    e[torch.arange(120), labels] += 2.0
    e[:, 3] += 1.5 * groups
    e[:, 6] += 1.5 * groups
    weight = [[1.0, 0, 0, 0.8, 0, 0, 0], [0, 1.0, 0, 0, 0.5, 0, 0], [0, 0, 1.0, 0, 0, 0.5, 0]]
    model = fixed_model(weight)
    ranking = sg.spurious_ranking(model, (e, labels, groups))
    assert [r["concept"] for r in ranking[:1]] == ["water"] and ranking[0]["rank"] == 1
    assert ranking[0]["eta2"] > 0.8 and ranking[0]["class_eta2"] < 0.2
    circle = ranking[0]["per_class"][0]
    assert circle["class"] == "circle" and circle["top_group"] == "1"
    assert circle["swing"] == pytest.approx(ranking[0]["score"] * 3 ** 0.5, rel=1e-4)  # one class of three
    red = next(r for r in ranking if r["concept"] == "red")
    assert red["score"] == 0.0 and red["per_class"] == []
    assert ranking[1]["score"] < 0.1 * ranking[0]["score"]
    shapes = [r for r in ranking if r["concept"] in CLASSES]
    assert all(r["class_eta2"] > 0.8 and r["eta2"] < 0.1 for r in shapes)
    proposals = sg.spurious_proposals(ranking, top=1)
    assert [(p.edits[0].op, p.edits[0].concept, p.edits[0].class_name, p.source) for p in proposals] == [
        ("prune", "water", None, "spurious")]


def test_spurious_ranking_needs_groups(fitted):
    model, data = fitted
    with pytest.raises(DataError):
        sg.spurious_ranking(model, (data.embeddings, data.labels))


def test_spurious_ranking_on_the_fitted_world(fitted):
    model, data = fitted
    pooled = sg.spurious_ranking(model, [data.split(name) for name in ("train", "test", "test_shifted")])
    assert {r["concept"] for r in pooled[:3]} == set(GROUPS), pooled[:4]
    assert pooled[3]["score"] < 0.5 * pooled[2]["score"]
    assert pooled == sg.spurious_ranking(model, data)  # one split holding every image: the same


# -- every proposal: local, and its preview is the applied edit ---------------------------------

def all_proposals(model, data):
    train, shifted = data.split("train"), data.split("test_shifted")
    rows = sg.sample_shots(shifted.labels, 4, seed=0)
    tfti = sg.tfti_proposals(model, train, sg.scored(model, shifted).rows(rows), max_source_drop=None)
    steps = sg.greedy_prunes(model, EvalCache.build(model, shifted), k=3, per_class=True)
    spurious = sg.spurious_proposals(sg.spurious_ranking(model, train), top=3)
    return tfti + sg.greedy_proposals(steps) + spurious


def test_proposals_touch_only_their_stated_weights(fitted):
    model, data = fitted
    proposals = all_proposals(model, data)
    assert {p.source for p in proposals} == {"tfti", "greedy", "spurious"}
    for proposal in proposals:
        edited, records = apply_edits(model, proposal.edits)
        assert changed_cells(model, edited) <= stated_cells(model, proposal), proposal.title
        assert {r["source"] for r in records} == {proposal.source}
        assert torch.equal(edited.head.bias_, model.head.bias_)
        json.dumps(proposal.to_dict())  # evidence is JSON-able


def test_applied_proposals_equal_their_previews(fitted):
    model, data = fitted
    proposals = all_proposals(model, data)
    for name in ("test", "test_shifted"):
        part = data.split(name)
        groups = torch.tensor([GROUPS.index(g) for g in part.groups])
        cache = EvalCache.build(model, part, groups=groups, group_names=GROUPS)
        for edits in [p.edits for p in proposals] + [[e for p in proposals for e in p.edits]]:
            edited, _ = apply_edits(model, edits)
            preview = preview_edits(cache, model, edited)
            full = classification_report(edited.decision_function(part.embeddings), part.labels, groups,
                                         CLASSES, GROUPS)
            assert preview["after"] == full


def test_tfti_on_the_fitted_world_helps_the_shifted_split(fitted):
    model, data = fitted
    shifted = data.split("test_shifted")
    rows = sg.sample_shots(shifted.labels, 4, seed=0)
    proposals = sg.tfti_proposals(model, data.split("train"), sg.scored(model, shifted).rows(rows),
                                  max_source_drop=None)
    edited, _ = apply_edits(model, [e for p in proposals for e in p.edits])
    rest = torch.ones(len(shifted), dtype=torch.bool)
    rest[rows] = False
    cache = sg.cache_rows(EvalCache.build(model, shifted), rest.nonzero().flatten())
    preview = preview_edits(cache, model, edited)
    assert preview["delta"]["accuracy"] > 0.05
    assert {c for p in proposals if p.kind == "mask" for c in p.concepts} <= set(GROUPS)


# -- adding a typed concept --------------------------------------------------------------------

class WordBackbone:
    """encode_texts maps a known word to its coordinate axis."""

    identity = ""
    embed_dim = DIM

    def encode_texts(self, texts):
        return torch.stack([torch.eye(DIM)[8 if "star" in t else 9] for t in texts])


def test_added_concept_previews_like_a_full_rebuild(fitted):
    model, data = fitted
    train, test = data.split("train"), data.split("test")
    new, record = add_text_concept(model, WordBackbone(), "a star", train.embeddings, train.labels, steps=50)
    cache = EvalCache.build(model, test)
    extended, padded = sg.extend_cache(cache, model, new, test.embeddings)
    rebuilt = EvalCache.build(new, test)
    torch.testing.assert_close(extended.features_t, rebuilt.features_t)
    preview = preview_edits(extended, padded, new)
    assert preview["before"]["accuracy"] == preview_edits(cache, model, model)["after"]["accuracy"]
    groups = torch.tensor([GROUPS.index(g) for g in test.groups])
    assert sorted(GROUPS) == extended.group_names == ["grass", "sand", "water"]
    full = classification_report(new.decision_function(test.embeddings), test.labels, groups, CLASSES, GROUPS)
    assert preview["after"]["accuracy"] == full["accuracy"]
    assert preview["after"]["per_class"] == full["per_class"]
    assert record["concept"] == "star"
    with pytest.raises(ConfigError):
        sg.extend_cache(cache, model, model, test.embeddings)


# -- the workflow and `pcbm suggest` -------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, fitted):
    model, data = fitted
    root = tmp_path_factory.mktemp("suggest-ws")
    ws = Workspace.open(root, create=True)
    path = ws.new_path("embeddings", "world", ".safetensors")
    data.save(path)
    ws.register("embeddings", "world", path)
    directory = ws.new_path("models", "pcbm")
    model.save(directory)
    ws.register("models", "pcbm", directory)
    return root


@pytest.mark.parametrize("method,extra", [("tfti", ["--max-source-drop", "1"]),
                                          ("greedy", ["--k", "3", "--metric", "worst_group"]),
                                          ("spurious", ["--top", "3"])])
def test_cli_suggest_prints_proposals_with_previews_on_every_split(workspace, method, extra):
    result = CliRunner().invoke(cli, ["suggest", "--workspace", str(workspace), "--method", method,
                                      "--model", "pcbm", "--seed", "1", "--json", *extra])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["method"] == method and body["proposals"]
    splits = {"train", "test", "test_shifted"} | ({"test_shifted:heldout"} if method == "tfti" else set())
    for proposal in body["proposals"]:
        assert set(proposal["preview"]) == splits
        assert {e["source"] for e in proposal["edits"]} == {method}
        assert set(proposal["preview"]["test"]["accuracy"]) == {"before", "after", "delta"}
    assert set(body["combined"]["preview"]) == splits
    if method == "tfti":
        assert body["shots"]["n"] == 12 and len(body["shots"]["image_ids"]) == 12
        held = body["combined"]["preview"]["test_shifted:heldout"]
        assert held["n"] == body["combined"]["preview"]["test_shifted"]["n"] - 12
    if method == "greedy":
        assert [len(p["edits"]) for p in body["proposals"]] == list(range(1, len(body["proposals"]) + 1))
    table = CliRunner().invoke(cli, ["suggest", "--workspace", str(workspace), "--method", method, *extra])
    assert table.exit_code == 0 and "proposal" in table.stdout


def test_cli_suggest_refuses_bad_input_in_one_line(workspace):
    for args in (["--method", "magic"], ["--method", "tfti", "--target-split", "nope"],
                 ["--method", "concept"], ["--method", "greedy", "--metric", "f1"]):
        result = CliRunner().invoke(cli, ["suggest", "--workspace", str(workspace), *args])
        assert result.exit_code == 2 and "Traceback" not in result.output, args


def test_measure_reports_tfti_greedy_and_ranks(workspace):
    from ml.suggest_workflow import measure

    # "water" is the planted concept here (the only name ending in "er")
    report = measure(workspace, seeds=[0], group_suffix="er", max_source_drop=1.0)
    assert report["planted"] == ["water"]
    assert len(report["tfti"]) == 1 and set(report["tfti"][0]) == {"seed", "proposals", "test", "heldout"}
    assert report["hand_prune"]["test_shifted"][1] > report["hand_prune"]["test_shifted"][0]
    assert report["greedy_accuracy"] and report["greedy_worst_group"]
    assert report["spurious_ranks_all"]["water"] <= 3
