"""The `pcbm` library commands end to end, on real image files and a tiny real open_clip model."""

import json

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from ml.cli import cli
from ml.pcbm import load_model
from ml.workspace import Workspace

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "backbone"
    model_dir.mkdir()
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**TINY).state_dict().items()},
              str(model_dir / "open_clip_model.safetensors"))
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    generator = torch.Generator().manual_seed(1)
    data = root / "data"
    for split, count in (("train", 24), ("val", 8), ("test", 8)):
        for i in range(count):
            label = "red" if i % 2 else "blue"
            base = torch.tensor(COLOURS[label]).float()
            pixels = (base + 30 * torch.randn(32, 32, 3, generator=generator)).clamp(0, 255).byte().numpy()
            path = data / split / label / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    examples = root / "examples"
    for concept in COLOURS:
        for kind, source in (("positives", concept), ("negatives", "blue" if concept == "red" else "red")):
            folder = examples / concept / kind
            folder.mkdir(parents=True)
            for i, image in enumerate(sorted((data / "train" / source).glob("*.png"))[:8]):
                (folder / f"{i}.png").write_bytes(image.read_bytes())
    phrases = root / "phrases.txt"
    phrases.write_text("# colours\nred\nblue\na round thing\n")
    return {"root": root, "spec": f"open_clip:local-dir:{model_dir}", "data": data, "examples": examples, "phrases": phrases}


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def workspace(setup):
    ws = setup["root"] / "ws"
    steps = [
        ("embed", setup["data"], "-w", ws, "--backbone", setup["spec"], "--name", "colours", "--json"),
        ("concepts", "text", setup["phrases"], "-w", ws, "--name", "text", "--json"),
        ("concepts", "examples", setup["examples"], "-w", ws, "--name", "cav", "--json"),
        ("train", "-w", ws, "--embeddings", "colours", "--bank", "text", "--name", "pcbm", "--json"),
        ("train", "-w", ws, "--embeddings", "colours", "--bank", "text", "--name", "hybrid", "--hybrid", "--json"),
    ]
    outputs = []
    for step in steps:
        result = run(*step)
        assert result.exit_code == 0, (step, result.output)
        outputs.append(json.loads(result.stdout))
    return ws, outputs


def test_pipeline_writes_every_artifact(workspace):
    ws, (embedded, text, cav, pcbm, hybrid) = workspace
    manifest = Workspace.open(ws)
    assert embedded["n_images"] == 40 and embedded["classes"] == ["blue", "red"]
    assert sorted(embedded["splits"]) == ["test", "train", "val"]
    assert text["concepts"] == ["red", "blue", "round thing"]  # a leading article is dropped, nothing else
    assert {c["name"] for c in cav["concepts"]} == {"red", "blue"}
    assert all(0.0 <= c["heldout_acc"] <= 1.0 for c in cav["concepts"])
    assert set(manifest.models) == {"pcbm", "hybrid"} and manifest.default_model == "pcbm"
    assert pcbm["kind"] == "pcbm" and hybrid["kind"] == "pcbm_h"
    assert set(pcbm["splits"]) == {"train", "val", "test"}


def test_embedding_twice_embeds_nothing_new(workspace, setup):
    ws, _ = workspace
    result = run("embed", setup["data"], "-w", ws, "--name", "again", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_new"] == 0


def test_decoding_workers_are_chosen_automatically_unless_given(tmp_path, setup, monkeypatch):
    import ml.embed

    asked = []
    monkeypatch.setattr(ml.embed, "auto_workers", lambda n, batch, device: asked.append((n, batch)) or 0)
    result = run("embed", setup["data"], "-w", tmp_path / "auto", "--backbone", setup["spec"], "--json")
    assert result.exit_code == 0, result.output
    assert len(asked) == 1 and asked[0][0] == json.loads(result.stdout)["n_images"]
    result = run("embed", setup["data"], "-w", tmp_path / "given", "--backbone", setup["spec"], "--workers", "0",
                 "--json")
    assert result.exit_code == 0 and len(asked) == 1  # --workers 0 is taken as given


def test_eval_reproduces_the_training_report(workspace):
    ws, outputs = workspace
    result = run("eval", "-w", ws, "--model", "pcbm", "--embeddings", "colours", "--json")
    assert result.exit_code == 0, result.output
    evaluated = json.loads(result.stdout)["splits"]
    for split, report in outputs[3]["splits"].items():
        assert evaluated[split]["accuracy"] == pytest.approx(report["accuracy"], abs=1e-9)


def test_explain_contributions_add_up_to_the_logit(workspace, setup):
    ws, _ = workspace
    image = next((setup["data"] / "test" / "red").glob("*.png"))
    result = run("explain", image, "-w", ws, "--model", "pcbm", "--json", "--top", "50")
    assert result.exit_code == 0, result.output
    explained = json.loads(result.stdout)
    assert explained["predicted"] in ("red", "blue")
    assert sum(explained["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    model = load_model(Workspace.open(ws).path_for("models", "pcbm"))
    k = model.class_names.index(explained["predicted"])
    total = explained["bias"] + sum(c["contribution"] for c in explained["contributions"])
    from ml.backbone import load_backbone
    from ml.data import open_image
    from ml.embed import embed_images

    logits = model.decision_function(embed_images(load_backbone(setup["spec"]), [open_image(image)]))
    assert total == pytest.approx(float(logits[0, k]), abs=1e-4)


def test_edit_previews_then_saves_a_new_model(workspace):
    ws, _ = workspace
    before = (ws / "workspace.json").read_text()
    dry = run("edit", "-w", ws, "--model", "pcbm", "--prune", "red", "--embeddings", "colours", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert (ws / "workspace.json").read_text() == before  # a dry run saves nothing
    preview = json.loads(dry.stdout)["preview"]
    assert set(preview) == {"train", "val", "test"}
    saved = run("edit", "-w", ws, "--model", "pcbm", "--prune", "red", "--embeddings", "colours", "--out", "no-red", "--json")
    assert saved.exit_code == 0, saved.output
    original = load_model(Workspace.open(ws).path_for("models", "pcbm"))
    edited = load_model(Workspace.open(ws).path_for("models", "no-red"))
    column = original.bank.names.index("red")
    assert torch.all(edited.head.weight_[:, column] == 0)
    others = [i for i in range(len(original.bank.names)) if i != column]
    assert torch.equal(edited.head.weight_[:, others], original.head.weight_[:, others])
    again = run("edit", "-w", ws, "--model", "pcbm", "--prune", "red", "--out", "no-red")
    assert again.exit_code == 2 and "already exists" in again.output


@pytest.mark.parametrize(
    "args, message",
    [
        (("train", "--bank", "nope", "--embeddings", "colours"), "unknown bank 'nope'"),
        (("eval", "--model", "ghost", "--embeddings", "colours"), "unknown model 'ghost'"),
        (("eval", "--model", "pcbm"), "name the embedded dataset with --embeddings (known: again, colours)"),
        (("edit", "--model", "pcbm", "--prune", "purple", "--dry-run", "--embeddings", "colours"), "purple"),
        (("edit", "--model", "pcbm", "--scale", "red"), "CONCEPT=FACTOR"),
        (("explain", "/no/such/image.png"), "/no/such/image.png"),
        (("concepts", "examples", "/no/such/dir", "--name", "x"), "/no/such/dir"),
    ],
)
def test_bad_input_is_one_clear_line(workspace, args, message):
    ws, _ = workspace
    before = (ws / "workspace.json").read_text()
    result = run(*args[:1], *args[1:], "-w", ws) if args[0] != "concepts" else run(*args, "-w", ws)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert (ws / "workspace.json").read_text() == before


def test_unknown_backbone_name_is_one_clear_line(tmp_path, setup):
    result = run("embed", setup["data"], "-w", tmp_path / "ws", "--backbone", "open_clip:ViT-Nope-99")
    assert result.exit_code == 2 and "ViT-Nope-99" in result.output and "Traceback" not in result.output
