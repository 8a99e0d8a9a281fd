"""Concept metrics on planted cases with known values, and `pcbm metrics` end to end."""

import json
import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from ml import cam
from ml import concept_metrics as cm
from ml import metrics_workflow as mw
from ml.backbone import SPATIAL_METHODS, register_spatial_method
from ml.cli import cli
from ml.concepts import ConceptBank
from ml.errors import ConfigError, DataError, ShapeError
from ml.head import SparseLinearHead


def grid(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_pointing_game_takes_the_first_maximum():
    maps = torch.stack([grid([9, 0], [0, 0]), grid([0, 0], [0, 9]), grid([1, 1], [1, 1])])
    regions = torch.stack([grid([1, 0], [0, 0]), grid([1, 1], [1, 0]), grid([0, 0], [1, 1])]).bool()
    assert cm.pointing_game(maps, regions).tolist() == [True, False, False]
    with pytest.raises(ShapeError):
        cm.pointing_game(maps, regions[:, :1])


def test_mask_iou_at_a_threshold():
    m = grid([1.0, 0.9, 0.0, 0.0], [0.8, 0.6, 0.1, 0.0], [0, 0, 0, 0], [0, 0, 0, 0])  # hot >= 0.5: a 2x2 corner
    region = grid([1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]).bool()  # the top row
    iou = cm.mask_iou(m[None], region[None], threshold=0.5)
    assert iou.item() == pytest.approx(2 / 6)
    assert cm.mask_iou(m[None] * 3 + 7, region[None]).item() == pytest.approx(2 / 6)  # min-max normalised
    assert cm.mask_iou(m[None], region[None], threshold=0.95).item() == pytest.approx(1 / 4)
    with pytest.raises(ConfigError):
        cm.mask_iou(m[None], region[None], threshold=1.5)


def test_mass_in_mask_against_the_area_baseline():
    region = grid([1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]).bool()
    focused = region.float() * 3 + 1  # all mass above the minimum lies in the region
    half = grid([2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0])
    flat = torch.full((4, 4), 5.0)
    share, area = cm.mass_in_mask(torch.stack([focused, half, flat]), region.expand(3, 4, 4))
    assert share.tolist() == pytest.approx([1.0, 0.5, 2 / 16])
    assert area.tolist() == pytest.approx([2 / 16] * 3)


def test_top_alpha_region_and_located():
    m = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)  # the top 25% are 12..15: the bottom row
    top = cm.top_region(m, 0.25)
    assert top.sum() == 4 and top[0, 3].all()
    two = torch.zeros(1, 4, 4, dtype=torch.bool)
    two[0, 3, :2] = True  # half of the top region
    one = torch.zeros(1, 4, 4, dtype=torch.bool)
    one[0, 3, 0] = True
    far = torch.zeros(1, 4, 4, dtype=torch.bool)
    far[0, 0, 0] = True
    regions = torch.cat([two, one, far])
    maps = m.expand(3, 4, 4)
    assert cm.located(maps, regions, 0.25).tolist() == [True, False, False]
    assert cm.located(maps, regions, 0.25, rule="any").tolist() == [True, True, False]
    assert cm.top_region(m, 0.01).sum() == 1  # never empty
    with pytest.raises(ConfigError):
        cm.located(maps, regions, 0.25, rule="centroid")
    with pytest.raises(ConfigError):
        cm.top_region(m, 0.0)


def test_cem_at_l_counts_present_concepts_among_the_top_contributors():
    contributions = grid([3, 2, 1, -1], [0, 0, 5, 0])
    present = grid([1, 0, 1, 1], [1, 0, 0, 0]).bool()
    out = cm.cem_at_l(contributions, present, l=2)
    # image 0: top-2 {0, 1}, one present; image 1: only concept 2 adds to the logit, absent
    assert out["per_image"].tolist() == [0.5, 0.0]
    assert out["value"] == pytest.approx(0.25)
    assert out["per_concept_top"].tolist() == [1, 1, 1, 0] and out["per_concept_hits"].tolist() == [1, 0, 0, 0]
    # counting zero contributions too, image 1's top-2 is {2, 0} and concept 0 is present
    assert cm.cem_at_l(contributions, present, l=2, positive_only=False)["value"] == pytest.approx(0.5)
    nothing = cm.cem_at_l(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool), l=2)
    assert math.isnan(nothing["value"])


def test_clm_at_l_locates_the_top_present_concepts():
    contributions = grid([3, 2, 1, -1], [0, 0, 5, 0])
    present = grid([1, 0, 1, 1], [1, 0, 1, 0]).bool()
    is_located = grid([1, 1, 0, 1], [1, 0, 1, 0]).bool()
    out = cm.clm_at_l(contributions, present, is_located, l=2)
    # image 0: present and positive {0, 2} -> 0 located, 2 not; image 1: {2} located
    assert out["n"] == 3 and out["value"] == pytest.approx(2 / 3)
    assert out["per_concept_n"].tolist() == [1, 0, 2, 0] and out["per_concept_hits"].tolist() == [1, 0, 1, 0]
    no_mask = torch.tensor([[True, True, False, True]] * 2)  # concept 2 has no annotated location
    assert cm.clm_at_l(contributions, present, is_located, no_mask, l=2)["value"] == pytest.approx(1.0)


def test_cgim_in_three_variants():
    labels = torch.tensor([0, 0, 1, 1])
    present = grid([1, 0, 1], [1, 0, 1], [0, 1, 0], [0, 1, 0]).bool()  # frequency: [[1, 0, 1], [0, 1, 0]]
    weight = grid([2, 0, 1], [0, 3, -1])
    z = grid([1, -1, 2], [3, -1, 0], [-1, 2, 0], [9, 9, 9])
    predictions = torch.tensor([0, 0, 1, 0])  # the last image is wrong: left out of the class means
    out = cm.cgim(weight, z, labels, predictions, present)
    # class means over correct images: class 0 -> [2, -1, 1], class 1 -> [-1, 2, 0]
    assert out["weight"].tolist() == pytest.approx([1.0, 1.0, 1 / math.sqrt(2)])
    assert out["score"].tolist() == pytest.approx([2 / math.sqrt(5), 2 / math.sqrt(5), 1.0])
    assert out["weight_x_score"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert cm.class_concept_frequency(present, labels, 2).tolist() == [[1, 0, 1], [0, 1, 0]]
    zero = cm.cgim(torch.zeros(2, 3), z, labels, predictions, present)["weight"]
    assert torch.isnan(zero).all() and cm.nanmean(zero) is None


def test_contributions_follow_the_chosen_class():
    weight = grid([1, 2], [3, 4])
    z = grid([1, 1], [2, 0])
    assert cm.contributions_to(z, weight, torch.tensor([1, 0])).tolist() == [[3, 4], [2, 0]]
    assert cm.pearson(torch.arange(4.0), 2 * torch.arange(4.0)) == pytest.approx(1.0)
    assert cm.pearson(torch.ones(3), torch.arange(3.0)) is None


# ---------------------------------------------------------------------------- stage 1 on a planted world
class RedIsObject:
    """Tokens = (share of red pixels, share of other pixels) per 4x4 patch of a 16x16 image."""

    identity = "toy-red"
    embed_dim = 2
    image_size = 16
    device = torch.device("cpu")
    architecture = "toy-red"

    def preprocess(self, image):
        pixels = np.asarray(image.convert("RGB").resize((16, 16), Image.Resampling.NEAREST), dtype=np.float32)
        red = torch.from_numpy((pixels[..., 0] > 128) & (pixels[..., 1] < 128)).float()
        return torch.stack([red, 1 - red, torch.zeros_like(red)])

    def spatial_tokens(self, images, method="default"):
        pooled = torch.nn.functional.avg_pool2d(images[:, :2], 4)
        return pooled.permute(0, 2, 3, 1)

    def encode_images(self, images):
        return self.spatial_tokens(images).mean(dim=(1, 2))

    def encode_texts(self, texts):
        raise NotImplementedError


@pytest.fixture
def planted(tmp_path):
    register_spatial_method("toy-red", ("toy-red",))(lambda visual, images: images)
    root = tmp_path / "ann"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["image,concept,present"]
    for i, (x, y) in enumerate([(0, 0), (8, 4), (12, 12)]):
        image = Image.new("RGB", (16, 16), (20, 160, 40))
        image.paste((220, 20, 20), (x, y, x + 4, y + 4))
        image.save(root / "images" / f"im{i}.png")
        mask = Image.new("L", (16, 16), 0)
        mask.paste(255, (x, y, x + 4, y + 4))
        mask.save(root / "masks" / f"im{i}.png")
        rows += [f"images/im{i}.png,thing,1", f"images/im{i}.png,ground,1", f"images/im{i}.png,sky,0"]
    (root / "attributes.csv").write_text("\n".join(rows) + "\n")
    (root / "world.json").write_text(json.dumps({"concepts": [
        {"name": "thing", "kind": "object", "group": "shape"}, {"name": "ground", "kind": "background", "group": "bg"},
        {"name": "sky", "kind": "background", "group": "bg"}]}))
    yield root
    SPATIAL_METHODS.pop("toy-red", None)


def test_localise_and_summarise_a_planted_world(planted):
    annotations = mw.load_annotations(planted)
    bank = ConceptBank(["thing", "ground", "sky"], torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]]))
    ids = [f"images/im{i}.png" for i in range(3)]
    table = mw.localise(RedIsObject(), bank, planted, ids, annotations, method="toy-red", alpha=1 / 16)
    assert table.present[:, :2].all() and not table.present[:, 2].any() and table.known.all()
    assert table.has_region.all() and table.pointing[:, :2].all()
    assert (table.iou[:, 0] > 0.9).all()  # the hot patch is the object, up to bilinear edges
    assert table.area[:, 0].tolist() == pytest.approx([1 / 16] * 3)
    assert table.located[:, 0].all()
    table.save(planted / "table.safetensors")  # what the app keeps between restarts
    again = mw.LocalisationTable.load(planted / "table.safetensors")
    assert again.concepts == table.concepts and again.method == "toy-red" and again.kinds == table.kinds
    assert all(torch.equal(again.tensors[k], v) for k, v in table.tensors.items())
    with pytest.raises(DataError):
        mw.LocalisationTable.load(planted / "attributes.csv")

    scores = RedIsObject().encode_images(torch.stack([RedIsObject().preprocess(Image.open(planted / i)) for i in ids]))
    z = bank.project(scores)
    head = SparseLinearHead(standardize=False)
    head.weight_, head.bias_ = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]), torch.zeros(2)
    head.mean_, head.scale_, head.n_classes_ = torch.zeros(3), torch.ones(3), 2
    report = mw.summarise(table, head, z, z @ head.weight_.T, torch.zeros(3, dtype=torch.long), l=2)
    assert report["pointing_game"]["object"] == 1.0 and report["pointing_game"]["background"] == 1.0
    assert report["pointing_game"]["per_group"] == {"shape": 1.0, "bg": 1.0}
    assert report["cem"] == pytest.approx(1.0)  # top-2 of class 0: thing and ground, both present
    assert report["per_concept"]["sky"]["n_present"] == 0 and report["per_concept"]["sky"]["existence"] is None
    assert report["per_concept"]["thing"]["existence"] == 1.0
    assert report["map_vs_score"]["pearson"] == pytest.approx(1.0)  # a mean-pooled toy: maps average to scores
    assert report["mass_in_mask"]["object"]["mass"] > report["mass_in_mask"]["object"]["area"]


def test_annotations_match_by_stem_and_refuse_a_bare_folder(planted, tmp_path):
    annotations = mw.load_annotations(planted)
    assert annotations.key("test/im1.png") == "images/im1.png"
    assert annotations.key("nowhere.png") is None
    regions, has = annotations.regions("im2.png", ["thing", "ground", "unknown"], 16)
    assert has.tolist() == [True, True, False] and regions[0].sum() == 16 and regions[1].sum() == 240
    (planted / "masks" / "unknown").mkdir()
    Image.new("L", (32, 32), 255).save(planted / "masks" / "unknown" / "im2.png")  # its own region wins
    regions, has = mw.load_annotations(planted).regions("im2.png", ["thing", "unknown"], 16)
    assert has.tolist() == [True, True] and regions[1].all()
    with pytest.raises(DataError, match="attributes.csv"):
        mw.load_annotations(tmp_path / "empty")


# ---------------------------------------------------------------------------- `pcbm metrics`
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def demo_workspace(tmp_path_factory):
    from ml import workflows
    from ml.demo.world import default_config, write_world

    root = tmp_path_factory.mktemp("metrics")
    folder = root / "backbone"
    folder.mkdir()
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**TINY).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    spec = f"open_clip:local-dir:{folder}"
    config = default_config().replace(image_size=32, counts={"train": 16, "val": 8, "test": 12}, concept_examples=2)
    world = write_world(config, root / "ws" / "world")
    workflows.embed(root / "ws", world / "manifest.csv", spec, "world")
    meta = json.loads((world / "world.json").read_text())
    workflows.text_bank(root / "ws", [c["phrases"][0] for c in meta["concepts"]], "text", backbone_spec=spec,
                        names=[c["name"] for c in meta["concepts"]])
    workflows.train(root / "ws", "world", "text", "pcbm", lam=0.01)
    return root / "ws"


def test_pcbm_metrics_json_on_a_demo_world(demo_workspace):
    result = CliRunner().invoke(cli, ["metrics", "--workspace", str(demo_workspace), "--model", "pcbm", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_images"] == 12 and report["method"] == cam.DEFAULT_MAP_METHOD["vit"]
    for kind in ("object", "background"):
        assert 0.0 <= report["pointing_game"][kind] <= 1.0
    assert set(report["cgim"]) == set(cm.CGIM_VARIANTS)
    assert report["cem"] is None or 0.0 <= report["cem"] <= 1.0
    assert report["clm"] is None or 0.0 <= report["clm"] <= 1.0
    water = report["per_concept"]["water background"]
    assert water["kind"] == "background" and water["group"] == "background"
    assert {"pointing_game", "existence", "location", "cgim", "mass_in_mask", "area", "iou"} <= set(water)
    assert report["pointing_game"]["chance"]["object"] < 0.5 < report["pointing_game"]["chance"]["background"]


def test_pcbm_metrics_other_method_limit_and_table(demo_workspace):
    result = CliRunner().invoke(cli, ["metrics", "-w", str(demo_workspace), "--method", "patch", "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "pointing game: object" in result.stdout and "water" in result.stdout


def test_pcbm_metrics_names_bad_input(demo_workspace, tmp_path):
    bad = CliRunner().invoke(cli, ["metrics", "-w", str(demo_workspace), "--method", "value", "--json"])
    assert bad.exit_code == 2 and "valid:" in bad.output
    bare = CliRunner().invoke(cli, ["metrics", "-w", str(demo_workspace), "--annotations", str(tmp_path), "--json"])
    assert bare.exit_code == 2 and "attributes.csv" in bare.output
