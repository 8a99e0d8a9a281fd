"""The library-backed editor agrees with the tensor editor, and drives the edit history."""

import pytest
import torch

from app.services import diffs, history, users
from app.services.head_editing import HeadState, ModelInfo, TensorHeadEditor
from app.services.ml_editing import MlHeadEditor

from .history_helpers import CLASSES, CONCEPTS, register_model

ml_editing = pytest.importorskip("ml.editing", reason="ml.editing is not there yet")
from ml.concepts import ConceptBank  # noqa: E402
from ml.head import SparseLinearHead  # noqa: E402


def real_head_state(seed=0) -> HeadState:
    generator = torch.Generator().manual_seed(seed)
    head = SparseLinearHead.from_state(
        {"weight": torch.randn(len(CLASSES), len(CONCEPTS), generator=generator), "bias": torch.zeros(len(CLASSES)),
         "mean": torch.zeros(len(CONCEPTS)), "scale": torch.ones(len(CONCEPTS))},
        {"kind": "sparse_linear_head", "lam": 1e-3, "l1_ratio": 0.99, "standardize": True, "max_iter": 10, "tol": 1e-6},
    )
    tensors, config = head.state_dict()
    return HeadState(tensors=tensors, config=config)


BANK = ConceptBank(names=list(CONCEPTS), vectors=torch.randn(len(CONCEPTS), 8, generator=torch.Generator().manual_seed(1)))
EDITS = [
    [{"op": "prune", "concept": "water"}],
    [{"op": "prune_normalize", "concept": "grass", "class_name": "dog"}],
    [{"op": "scale", "concept": "furry", "value": -2.0}],
    [{"op": "set", "concept": "striped", "class_name": "cat", "value": 1.5}],
    [{"op": "prune", "concept": "water"}, {"op": "restore", "concept": "water", "class_name": "bird"}],
]


@pytest.mark.parametrize("edits", EDITS, ids=lambda e: "+".join(x["op"] for x in e))
def test_both_editors_produce_the_same_weights(edits):
    state = real_head_state()
    info = ModelInfo(model_id=1, kind="pcbm", concept_names=list(CONCEPTS), class_names=list(CLASSES),
                     initial_state=lambda: state)
    ml_result = MlHeadEditor(lambda model: BANK)(info, state, edits)
    tensor_result = TensorHeadEditor()(info, state, edits)
    assert torch.allclose(ml_result.state.tensors["weight"], tensor_result.state.tensors["weight"], atol=1e-6)
    assert torch.equal(state.tensors["weight"], real_head_state().tensors["weight"])  # input untouched


def test_the_history_runs_on_the_library_editor(db, ctx):
    author = users.create_user(db, "lib", "researcher")
    model = register_model(db, ctx.artifacts, author)  # for its dataset, backbone and bank rows
    editor = MlHeadEditor(lambda info: BANK)
    lib_model = history.create_model(db, ctx.artifacts, name="lib", kind="pcbm", dataset_id=model.dataset_id,
                                     backbone_id=model.backbone_id, bank_id=model.bank_id, head=real_head_state(),
                                     author=author)
    version = history.commit_edit(db, ctx.artifacts, lib_model.id, 1, [{"op": "prune", "concept": "water"}],
                                  author=author, editor=editor)
    assert version.number == 2 and version.edit["records"][0]["changes"]
    history.commit_edit(db, ctx.artifacts, lib_model.id, 2, [{"op": "restore", "concept": "water"}],
                        author=author, editor=editor)
    assert history.get_version(db, lib_model.id, 3).weights_hash == history.get_version(db, lib_model.id, 1).weights_hash
    assert diffs.verify_history(db, ctx.artifacts, lib_model.id, editor) == []
    with pytest.raises(ml_editing.ConfigError):
        history.commit_edit(db, ctx.artifacts, lib_model.id, 3, [{"op": "prune", "concept": "wings"}],
                            author=author, editor=editor)
