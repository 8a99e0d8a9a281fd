"""The edit history service: append-only versions, optimistic locking, all-or-nothing commits."""

import threading
from itertools import count

import pytest
import torch
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select

from app.context import build_context
from app.errors import InvalidInput, NotFound, VersionConflict
from app.models import AuditEvent, Model, ModelVersion, Role
from app.services import audit, diffs, history, users
from app.services.head_editing import TensorHeadEditor
from ml.errors import ConfigError, DataError
from ml.store import tensors_sha256

from .history_helpers import CONCEPTS, register_model

EDITOR = TensorHeadEditor()


@pytest.fixture
def hctx(any_settings):
    ctx = build_context(any_settings)
    yield ctx
    ctx.close()


@pytest.fixture
def session(hctx):
    s = hctx.session_factory()
    yield s
    s.close()


@pytest.fixture
def author(session):
    return users.create_user(session, "editor", Role.RESEARCHER)


@pytest.fixture
def model(session, hctx, author):
    return register_model(session, hctx.artifacts, author)


def counts(session, model_id):
    session.rollback()
    versions = session.scalar(select(func.count()).select_from(ModelVersion).where(ModelVersion.model_id == model_id))
    events = session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.object_type == "model"))
    head = session.scalar(select(Model.head_number).where(Model.id == model_id))
    return versions, events, head


def prune(concept):
    return [{"op": "prune", "concept": concept}]


class TestCommitEdit:
    def test_appends_a_version_on_the_head(self, session, hctx, model, author):
        version = history.commit_edit(session, hctx.artifacts, model.id, 1, prune("water"), author=author,
                                      editor=EDITOR, message="water is a shortcut")
        assert (version.number, version.parent_id, version.author_id) == (2, history.get_version(session, model.id, 1).id, author.id)
        assert version.edit["op"] == "edit" and version.edit["edits"][0]["concept"] == "water"
        state = history.load_state(session, hctx.artifacts, model.id)
        column = CONCEPTS.index("water")
        assert torch.all(state.tensors["weight"][:, column] == 0)
        before = history.load_state(session, hctx.artifacts, model.id, 1)
        assert torch.equal(torch.cat([state.tensors["weight"][:, :column], state.tensors["weight"][:, column + 1:]], 1),
                           torch.cat([before.tensors["weight"][:, :column], before.tensors["weight"][:, column + 1:]], 1))
        assert counts(session, model.id) == (2, 2, 2)  # model.create + model.edit events
        event_ = audit.list_events(session, object_type="model", object_id=model.id)[0]
        assert event_.action == "model.edit" and event_.user_id == author.id and event_.payload["version"] == 2

    def test_a_stale_base_version_conflicts_and_names_the_head(self, session, hctx, model, author):
        history.commit_edit(session, hctx.artifacts, model.id, 1, prune("water"), author=author, editor=EDITOR)
        with pytest.raises(VersionConflict) as caught:
            history.commit_edit(session, hctx.artifacts, model.id, 1, prune("grass"), author=author, editor=EDITOR)
        assert caught.value.status_code == 409
        assert caught.value.detail["current_version"]["number"] == 2
        assert counts(session, model.id) == (2, 2, 2)

    def test_an_edit_the_editor_refuses_writes_nothing(self, session, hctx, model, author):
        with pytest.raises(ConfigError, match="unknown concept"):
            history.commit_edit(session, hctx.artifacts, model.id, 1, prune("wings"), author=author, editor=EDITOR)
        assert counts(session, model.id) == (1, 1, 1)

    def test_an_unknown_model_is_not_found(self, session, hctx, author):
        with pytest.raises(NotFound):
            history.commit_edit(session, hctx.artifacts, 999, 1, prune("water"), author=author, editor=EDITOR)


class TestUndoAndRevert:
    def test_undo_appends_the_parents_weights(self, session, hctx, model, author):
        history.commit_edit(session, hctx.artifacts, model.id, 1, prune("water"), author=author, editor=EDITOR)
        version = history.undo(session, hctx.artifacts, model.id, 2, author=author)
        first = history.get_version(session, model.id, 1)
        assert version.number == 3 and version.edit == {"op": "undo", "undone": 2, "restored": 1}
        assert version.weights_hash == first.weights_hash
        assert version.parent_id == history.get_version(session, model.id, 2).id
        assert [v.number for v in history.list_versions(session, model.id)] == [1, 2, 3]

    def test_revert_appends_that_versions_weights(self, session, hctx, model, author):
        history.commit_edit(session, hctx.artifacts, model.id, 1, prune("water"), author=author, editor=EDITOR)
        history.commit_edit(session, hctx.artifacts, model.id, 2, prune("grass"), author=author, editor=EDITOR)
        version = history.revert(session, hctx.artifacts, model.id, 3, 2, author=author)
        assert version.number == 4 and version.edit == {"op": "revert", "to": 2}
        assert version.weights_hash == history.get_version(session, model.id, 2).weights_hash
        assert len({v.weights_hash for v in history.list_versions(session, model.id)}) == 3  # v4 == v2
        assert diffs.verify_history(session, hctx.artifacts, model.id, EDITOR) == []

    def test_undo_of_the_first_version_is_refused(self, session, hctx, model, author):
        with pytest.raises(InvalidInput, match="nothing to undo"):
            history.undo(session, hctx.artifacts, model.id, 1, author=author)

    def test_revert_to_the_head_or_a_missing_version_is_refused(self, session, hctx, model, author):
        with pytest.raises(InvalidInput):
            history.revert(session, hctx.artifacts, model.id, 1, 1, author=author)
        with pytest.raises(NotFound):
            history.revert(session, hctx.artifacts, model.id, 1, 7, author=author)
        with pytest.raises(VersionConflict):
            history.undo(session, hctx.artifacts, model.id, 5, author=author)


def test_diff_names_the_changed_weights(session, hctx, model, author):
    history.commit_edit(session, hctx.artifacts, model.id, 1, prune("water"), author=author, editor=EDITOR)
    result = diffs.diff_versions(session, hctx.artifacts, model.id, 1, 2)
    assert {c["concept_name"] for c in result["weight_changes"]} == {"water"}
    assert {c["class_name"] for c in result["weight_changes"]} == {"cat", "dog", "bird"}
    assert all(c["after"] == 0.0 for c in result["weight_changes"])
    weight = next(t for t in result["tensors"] if t["name"] == "weight")
    assert weight["changed"] == 3 and result["config_changes"] == {}


def test_a_damaged_artifact_is_detected(session, hctx, model):
    version = history.get_version(session, model.id, 1)
    path = hctx.artifacts.path(version.artifact_key)
    tensors, _ = hctx.artifacts.get(version.artifact_key)
    tensors["weight"] = tensors["weight"] + 1
    from ml.store import save_tensors

    save_tensors(path, tensors)
    with pytest.raises(DataError, match="corrupt"):
        history.load_state(session, hctx.artifacts, model.id, 1)


def _raise(error):
    def broken(*args, **kwargs):
        raise error
    return broken


def _mark_version_flush(session, _context):
    if any(isinstance(obj, ModelVersion) for obj in session.new):
        session.info["version_flushed"] = True


def _fail_commit_with_a_version(session):
    if session.info.pop("version_flushed", False):
        raise RuntimeError("commit failed")


@pytest.mark.parametrize("point", ["artifact", "audit", "commit"])
def test_a_failure_at_any_step_writes_nothing(session, hctx, model, author, point):
    """Before the artifact, after the version row and head move, at the commit itself."""
    before = counts(session, model.id)
    keys_before = set(hctx.artifacts.keys())
    with pytest.MonkeyPatch.context() as patch:
        if point == "artifact":
            patch.setattr(hctx.artifacts, "put", _raise(OSError("disk full")))
        elif point == "audit":
            patch.setattr(audit, "record", _raise(RuntimeError("crash after the version row")))
        else:
            event.listen(session, "after_flush", _mark_version_flush)
            event.listen(session, "before_commit", _fail_commit_with_a_version)
        try:
            with pytest.raises((OSError, RuntimeError)):
                history.commit_edit(session, hctx.artifacts, model.id, 1, prune("water"), author=author,
                                    editor=EDITOR)
        finally:
            if point == "commit":
                event.remove(session, "after_flush", _mark_version_flush)
                event.remove(session, "before_commit", _fail_commit_with_a_version)
    assert counts(session, model.id) == before
    assert history.head_version(session, model.id).number == 1
    # A weights file written before the failed commit is unreferenced and gets collected.
    referenced = {v.artifact_key for v in session.scalars(select(ModelVersion))}
    orphans = set(hctx.artifacts.keys()) - keys_before
    assert orphans.isdisjoint(referenced)
    assert set(hctx.artifacts.collect_garbage(referenced, older_than_s=0)) == orphans
    assert set(hctx.artifacts.keys()) == keys_before
    # The model takes the same edit afterwards, and the committed version finds its file.
    version = history.commit_edit(session, hctx.artifacts, model.id, 1, prune("water"), author=author, editor=EDITOR)
    assert version.number == 2 and hctx.artifacts.path(version.artifact_key).is_file()


def test_two_concurrent_edits_of_one_version_commit_exactly_once(hctx, model, author):
    """Both writers read version 1 (a barrier holds them until they have), then race to commit."""
    barrier = threading.Barrier(2, timeout=20)

    def racing_editor(info, state, edits):
        barrier.wait()  # both have passed the base-version check
        return EDITOR(info, state, edits)

    outcomes, errors = [], []

    def edit(concept):
        session = hctx.session_factory()
        try:
            outcomes.append(history.commit_edit(session, hctx.artifacts, model.id, 1, prune(concept),
                                                author=author, editor=racing_editor).number)
        except VersionConflict as exc:
            errors.append(exc)
        finally:
            session.close()

    threads = [threading.Thread(target=edit, args=(c,)) for c in ("water", "grass")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes == [2] and len(errors) == 1
    assert errors[0].detail["current_version"]["number"] == 2
    with hctx.session_factory() as session:
        assert counts(session, model.id) == (2, 2, 2)
        assert diffs.verify_history(session, hctx.artifacts, model.id, EDITOR) == []


operations = st.lists(
    st.one_of(
        st.tuples(st.just("edit"), st.sampled_from(["prune", "prune_normalize", "set", "scale", "restore"]),
                  st.sampled_from(CONCEPTS), st.sampled_from([None, "cat", "bird"])),
        st.tuples(st.just("undo")),
        st.tuples(st.just("revert"), st.integers(min_value=1, max_value=12)),
        st.tuples(st.just("stale")),
    ),
    min_size=1, max_size=8,
)
_names = count()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@hypothesis_settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations)
def test_any_sequence_keeps_a_contiguous_chain_that_replays_exactly(hctx, author, ops):
    session = hctx.session_factory()
    try:
        model = register_model(session, hctx.artifacts, author, name=f"m{next(_names)}")
        head = 1
        for op in ops:
            try:
                if op[0] == "edit":
                    edit = {"op": op[1], "concept": op[2], "class_name": op[3]}
                    if op[1] in ("set", "scale"):
                        edit["value"] = 0.5
                    head = history.commit_edit(session, hctx.artifacts, model.id, head, [edit], author=author,
                                               editor=EDITOR).number
                elif op[0] == "undo":
                    head = history.undo(session, hctx.artifacts, model.id, head, author=author).number
                elif op[0] == "revert":
                    head = history.revert(session, hctx.artifacts, model.id, head, op[1], author=author).number
                else:
                    with pytest.raises(VersionConflict):
                        history.undo(session, hctx.artifacts, model.id, head + 1, author=author)
            except (InvalidInput, NotFound):
                pass  # undo of version 1, revert to the head or to a version that does not exist yet
        assert diffs.verify_history(session, hctx.artifacts, model.id, EDITOR) == []
        current = history.load_state(session, hctx.artifacts, model.id)
        replayed = diffs.replay_history(session, hctx.artifacts, model.id, EDITOR)[head]
        assert tensors_sha256(current.tensors) == tensors_sha256(replayed.tensors)
    finally:
        session.close()
