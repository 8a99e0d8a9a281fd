"""The model service and the workspace import: idempotent import, caches, LRU, new heads."""

import shutil
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from app.models import Backbone, ConceptBank, Dataset, Model, ModelVersion
from app.services import history
from app.services.model_service import ModelService, NotServable, model_origin, resolve_device
from app.services.workspace_import import import_workspace
from ml.embed import EmbeddedDataset
from ml.errors import DataError
from ml.pcbm import PCBMHybrid, load_model
from ml.workflows import split_reports

from .conftest import make_settings
from .history_helpers import register_model
from .workspace_helpers import CLASSES, CONCEPTS, copy_workspace, tiny_backbone, tiny_workspace  # noqa: F401


def counts(db):
    return {table.__name__: db.scalar(select(func.count()).select_from(table))
            for table in (Backbone, Dataset, ConceptBank, Model, ModelVersion)}


@pytest.fixture
def ids(db, ctx, tiny_workspace):
    return dict(zip(["pcbm", "pcbm_h"], import_workspace(db, ctx, tiny_workspace), strict=True))


def embedded(workspace):
    return EmbeddedDataset.load(workspace / "embeddings" / "toy.safetensors")


class TestImport:
    def test_registers_every_part(self, db, ids, tiny_workspace, tiny_backbone):
        models = {m.name: m for m in history.list_models(db)}
        assert set(models) == {"pcbm", "pcbm_h"}
        assert models["pcbm"].kind.value == "pcbm" and models["pcbm_h"].kind.value == "pcbm_h"
        model = models["pcbm"]
        assert model.bank.name == "concepts" and models["pcbm_h"].bank_id == model.bank_id  # one bank row
        assert [c.name for c in model.bank.concepts] == CONCEPTS
        assert model.bank.concepts[0].info["heldout_acc"] == pytest.approx(0.6)
        assert model.backbone.spec == tiny_backbone.spec and model.backbone.identity == tiny_backbone.identity
        dataset = model.dataset
        assert dataset.name == "toy" and dataset.classes == CLASSES
        assert dataset.info["splits"] == {"test": 48, "train": 120, "val": 30}
        assert set(dataset.info["groups"]) == {"land", "water"}
        assert sum(dataset.info["counts"]["test"].values()) == 48
        assert model_origin(dataset.info, model.id)["path"] == "models/pcbm"

    def test_version_one_is_the_saved_head_with_metrics_per_split(self, db, ctx, ids, tiny_workspace):
        saved = load_model(tiny_workspace / "models" / "pcbm")
        state = history.load_state(db, ctx.artifacts, ids["pcbm"])
        assert torch.equal(state.tensors["weight"], saved.head.weight_)
        version = history.get_version(db, ids["pcbm"], 1)
        expected = split_reports(saved, embedded(tiny_workspace))
        assert {s: m["accuracy"] for s, m in version.metrics.items()} == {s: r["accuracy"] for s, r in expected.items()}

    def test_importing_twice_creates_nothing(self, db, ctx, ids, tiny_workspace):
        before = counts(db)
        assert import_workspace(db, ctx, tiny_workspace) == [ids["pcbm"], ids["pcbm_h"]]
        assert counts(db) == before

    def test_an_import_interrupted_before_recording_the_origin_is_adopted(self, db, ctx, ids, tiny_workspace):
        dataset = db.scalar(select(Dataset))
        info = dict(dataset.info)
        info["models"] = {k: v for k, v in info["models"].items() if k != str(ids["pcbm"])}
        dataset.info = info
        db.commit()
        before = counts(db)
        assert import_workspace(db, ctx, tiny_workspace)[0] == ids["pcbm"]
        assert counts(db) == before
        assert str(ids["pcbm"]) in db.scalar(select(Dataset.info)).get("models")

    def test_a_changed_model_file_is_a_new_model_and_the_old_one_stops_serving(self, db, ctx, tmp_path, tiny_workspace):
        workspace = copy_workspace(tiny_workspace, tmp_path / "copy")
        first = import_workspace(db, ctx, workspace)
        model = load_model(workspace / "models" / "pcbm")
        model.head.weight_[0, 0] += 1.0
        model.save(workspace / "models" / "pcbm")
        second = import_workspace(db, ctx, workspace)
        assert second[1] == first[1] and second[0] != first[0]
        assert history.get_model(db, second[0]).name.startswith("pcbm-")
        with pytest.raises(NotServable, match="changed since it was imported"):
            ctx.models.get(first[0])
        assert ctx.models.get(second[0]).head.weight_[0, 0] == model.head.weight_[0, 0]

    def test_no_workspace_is_a_clear_error(self, db, ctx, tmp_path):
        with pytest.raises(DataError, match="no workspace"):
            import_workspace(db, ctx, tmp_path)


class TestService:
    def test_serves_every_split_with_the_current_head(self, ctx, ids, tiny_workspace):
        entry = ctx.models.get(ids["pcbm_h"])
        data = embedded(tiny_workspace)
        assert entry.version == 1 and set(entry.splits) == {"train", "val", "test"}
        model = load_model(tiny_workspace / "models" / "pcbm_h")
        assert isinstance(entry.model, PCBMHybrid)
        for name, split in entry.splits.items():
            part = data.split(name)
            assert split.image_ids == part.image_ids
            torch.testing.assert_close(split.logits.cpu(), model.decision_function(part.embeddings))
        assert entry.index[data.image_ids[0]] == (data.splits[0], 0)

    def test_a_commit_is_served_next_keeping_the_cached_scores(self, db, ctx, ids, tiny_workspace):
        service = ctx.models
        before = service.get(ids["pcbm_h"])
        history.commit_edit(db, ctx.artifacts, ids["pcbm_h"], 1, [{"op": "prune", "concept": "feathers"}],
                            author=None, editor=ctx.head_editor)
        after = service.get(ids["pcbm_h"])
        assert after.version == 2 and after.head.weight_[:, 0].eq(0).all()
        assert after.splits["test"].cache.features_t is before.splits["test"].cache.features_t
        edited = load_model(tiny_workspace / "models" / "pcbm_h")
        edited.pcbm.head.weight_[:, 0] = 0.0
        test = embedded(tiny_workspace).split("test")
        torch.testing.assert_close(after.splits["test"].logits.cpu(), edited.decision_function(test.embeddings))
        history.undo(db, ctx.artifacts, ids["pcbm_h"], 2, author=None)
        undone = service.get(ids["pcbm_h"])
        assert undone.version == 3 and torch.equal(undone.head.weight_, before.head.weight_)

    def test_lru_eviction_under_a_tiny_budget_reloads_transparently(self, ctx, ids):
        one = ModelService(ctx.settings, ctx.session_factory, ctx.artifacts, "cpu")
        size = one.get(ids["pcbm"]).nbytes
        service = ModelService(ctx.settings, ctx.session_factory, ctx.artifacts, "cpu",
                               memory_budget_bytes=size + size // 2)
        first = service.get(ids["pcbm"])
        service.get(ids["pcbm_h"])
        assert service.loaded_model_ids() == [ids["pcbm_h"]] and service.evictions == 1
        again = service.get(ids["pcbm"])
        assert again is not first and service.loaded_model_ids() == [ids["pcbm"]]
        assert torch.equal(again.splits["test"].logits, first.splits["test"].logits)
        assert service.memory_used_bytes <= service.memory_budget_bytes

    def test_load_all_loads_imported_models_and_reports_broken_ones(self, db, ctx, tmp_path, tiny_workspace):
        register_model(db, ctx.artifacts, author=None)  # not imported: skipped
        workspace = copy_workspace(tiny_workspace, tmp_path / "copy")
        ids = import_workspace(db, ctx, workspace)
        (workspace / "models" / "pcbm_h" / "model.safetensors").unlink()
        outcome = ctx.models.load_all()
        assert outcome[ids[0]] == "loaded" and "missing" in outcome[ids[1]]
        assert ctx.models.loaded_model_ids() == [ids[0]] and ids[1] in ctx.models.errors

    def test_damaged_embeddings_make_the_model_not_servable(self, db, ctx, tmp_path, tiny_workspace):
        workspace = copy_workspace(tiny_workspace, tmp_path / "copy")
        ids = import_workspace(db, ctx, workspace)
        (workspace / "embeddings" / "toy.safetensors").write_bytes(b"not safetensors")
        with pytest.raises(NotServable, match="cannot be loaded"):
            ctx.models.get(ids[0])

    def test_a_model_that_was_not_imported_is_not_servable(self, db, ctx):
        model = register_model(db, ctx.artifacts, author=None)
        with pytest.raises(NotServable, match="not imported"):
            ctx.models.get(model.id)

    def test_editing_uses_the_library_for_imported_models_and_tensors_otherwise(self, db, ctx, ids):
        plain = register_model(db, ctx.artifacts, author=None)
        version = history.commit_edit(db, ctx.artifacts, plain.id, 1, [{"op": "prune", "concept": "water"}],
                                      author=None, editor=ctx.head_editor)
        assert "after" in version.edit["records"][0]  # TensorHeadEditor's records
        version = history.commit_edit(db, ctx.artifacts, ids["pcbm"], 1, [{"op": "prune", "concept": "water"}],
                                      author=None, editor=ctx.head_editor)
        assert "changes" in version.edit["records"][0]  # ml.editing's records

    def test_bank_for_reads_only_the_model_file(self, db, ctx, ids, tiny_workspace):
        info = history.model_info(db, history.get_model(db, ids["pcbm"]))
        bank = ctx.models.bank_for(info)
        assert bank.names == CONCEPTS and ctx.models.loaded_model_ids() == []

    def test_backbones_are_shared_by_spec(self, ctx, ids, tiny_backbone):
        first, second = ctx.models.get(ids["pcbm"]), ctx.models.get(ids["pcbm_h"])
        assert ctx.models.backbone(first.backbone_spec) is ctx.models.backbone(second.backbone_spec)


def test_readers_and_a_committer_in_parallel_see_only_whole_versions(db, ctx, ids):
    from app.errors import VersionConflict
    from app.services import inspect

    errors, seen = [], set()

    def read():
        for _ in range(15):
            try:
                page = inspect.browse_images(ctx.models, ids["pcbm"], split="test", per_page=1)
                entry = ctx.models.get(ids["pcbm"])
                seen.add(page["version"])
                assert entry.splits["test"].cache.base_weight.equal(entry.head.weight_.to(ctx.models.device))
            except VersionConflict:
                pass
            except Exception as exc:  # noqa: BLE001 - the assertion below shows it
                errors.append(repr(exc))

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for base, concept in enumerate(["sky", "grass", "water"], start=1):
        history.commit_edit(db, ctx.artifacts, ids["pcbm"], base, [{"op": "prune", "concept": concept}],
                            author=None, editor=ctx.head_editor)
    for thread in threads:
        thread.join()
    assert errors == [] and seen <= {1, 2, 3, 4}
    assert ctx.models.get(ids["pcbm"]).version == 4


def test_device_auto_follows_cuda_availability():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"


def test_the_default_loader_imports_the_served_workspace(workspace, tiny_workspace):
    for child in tiny_workspace.iterdir():
        target = workspace / child.name
        shutil.copytree(child, target) if child.is_dir() else shutil.copy(child, target)
    app = create_app(make_settings(workspace))
    with TestClient(app) as client:
        ctx = app.state.ctx
        for _ in range(300):
            if ctx.readiness.models_loaded:
                break
            time.sleep(0.05)
        assert client.get("/readyz").status_code == 200
        assert len(ctx.models.loaded_model_ids()) == 2
