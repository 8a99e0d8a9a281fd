"""Micro-batching of uploads: the batcher itself, the model service, and the predict endpoint."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from app.errors import Unavailable
from app.services import inspect
from app.services.batcher import MicroBatcher
from app.services.workspace_import import import_workspace
from ml.data import open_image
from ml.embed import embed_images

from .workspace_helpers import png_bytes, tiny_backbone, tiny_workspace  # noqa: F401

BASE = "/api/v1/models"


class Recorder:
    """A run_batch that records its batches and can be held (to let a queue build up)."""

    def __init__(self):
        self.batches: list[tuple[object, list]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, key, items):
        self.started.set()
        self.gate.wait(10)
        self.batches.append((key, list(items)))
        return [(key, item * 10) for item in items]


def hold_worker(batcher: MicroBatcher, recorder: Recorder):
    """Occupy the worker with one item, so later submissions queue up behind it."""
    recorder.gate.clear()
    recorder.started.clear()
    first = batcher.submit("hold", 0)
    assert recorder.started.wait(5)
    return first


class TestMicroBatcher:
    def test_items_queued_during_a_batch_go_together_into_the_next(self):
        recorder = Recorder()
        batcher = MicroBatcher(recorder, window_s=0.0, max_batch=8, max_pending=100)
        first = hold_worker(batcher, recorder)
        futures = [batcher.submit("a", i) for i in range(5)]
        recorder.gate.set()
        assert [f.result(5) for f in futures] == [("a", i * 10) for i in range(5)]
        assert first.result(5) == ("hold", 0)
        assert recorder.batches == [("hold", [0]), ("a", [0, 1, 2, 3, 4])]
        assert batcher.stats.largest_batch == 5 and batcher.stats.items == 6
        batcher.close()

    def test_max_batch_splits_and_keys_never_mix(self):
        recorder = Recorder()
        batcher = MicroBatcher(recorder, window_s=0.0, max_batch=3, max_pending=100)
        hold_worker(batcher, recorder)
        futures = [batcher.submit("ab"[i % 2], i) for i in range(10)]
        recorder.gate.set()
        assert [f.result(5)[1] for f in futures] == [i * 10 for i in range(10)]
        batches = recorder.batches[1:]
        assert all(len(items) <= 3 for _, items in batches)
        assert all({key} == {"ab"[i % 2] for i in items} for key, items in batches)
        assert sorted(i for _, items in batches for i in items) == list(range(10))
        assert batches[0] == ("a", [0, 2, 4])  # the oldest item's key goes first, in arrival order
        batcher.close()

    def test_the_window_collects_items_arriving_after_the_first(self):
        recorder = Recorder()
        batcher = MicroBatcher(recorder, window_s=0.3, max_batch=16, max_pending=100)
        futures = [batcher.submit("k", 0), batcher.submit("k", 1)]
        time.sleep(0.05)  # the worker is waiting for company now
        futures += [batcher.submit("k", i) for i in (2, 3)]
        assert [f.result(5)[1] for f in futures] == [0, 10, 20, 30]
        assert recorder.batches == [("k", [0, 1, 2, 3])]
        batcher.close()

    def test_a_lone_request_does_not_wait_for_the_window(self):
        recorder = Recorder()
        batcher = MicroBatcher(recorder, window_s=2.0, max_batch=16)
        start = time.monotonic()
        assert batcher("k", 1) == ("k", 10)
        assert time.monotonic() - start < 1.5
        time.sleep(2.1)  # longer than a window since the last request: still alone
        start = time.monotonic()
        assert batcher("k", 2) == ("k", 20)
        assert time.monotonic() - start < 1.5
        batcher.close()

    def test_a_full_batch_does_not_wait_for_the_window(self):
        recorder = Recorder()
        batcher = MicroBatcher(recorder, window_s=30.0, max_batch=4, max_pending=100)
        hold_worker(batcher, recorder)
        futures = [batcher.submit("k", i) for i in range(5)]
        start = time.monotonic()
        recorder.gate.set()
        assert [f.result(5)[1] for f in futures[:4]] == [0, 10, 20, 30]
        assert time.monotonic() - start < 5
        assert recorder.batches[1] == ("k", [0, 1, 2, 3])
        futures[4].cancel()  # the fifth would wait out the window for company
        batcher.close()

    def test_without_a_window_a_lone_item_runs_at_once(self):
        batcher = MicroBatcher(Recorder(), window_s=0.0, max_batch=32)
        start = time.monotonic()
        assert batcher("k", 7) == ("k", 70)
        assert time.monotonic() - start < 1
        batcher.close()

    def test_a_full_queue_is_refused_at_once_with_retry_after(self):
        recorder = Recorder()
        batcher = MicroBatcher(recorder, window_s=0.0, max_batch=2, max_pending=3)
        hold_worker(batcher, recorder)
        queued = [batcher.submit("k", i) for i in range(3)]
        start = time.monotonic()
        with pytest.raises(Unavailable) as refused:
            batcher.submit("k", 99)
        assert time.monotonic() - start < 0.1
        assert refused.value.status_code == 503 and int(refused.value.headers["Retry-After"]) >= 1
        assert batcher.stats.rejected == 1
        recorder.gate.set()
        assert [f.result(5)[1] for f in queued] == [0, 10, 20]
        batcher.close()

    def test_errors_reach_the_right_requests(self):
        def run(key, items):
            if key == "boom":
                raise RuntimeError("the whole batch failed")
            return [ValueError(f"bad {i}") if i < 0 else i for i in items]

        batcher = MicroBatcher(run, window_s=0.2, max_batch=8)
        good, bad = batcher.submit("k", 1), batcher.submit("k", -1)
        assert good.result(5) == 1
        with pytest.raises(ValueError, match="bad -1"):
            bad.result(5)
        with pytest.raises(RuntimeError, match="whole batch"):
            batcher("boom", 1)
        assert batcher("k", 2) == 2  # the worker survives failures
        batcher.close()

    def test_cancelled_requests_are_skipped(self):
        recorder = Recorder()
        batcher = MicroBatcher(recorder, window_s=0.0, max_batch=8)
        hold_worker(batcher, recorder)
        gone, kept = batcher.submit("k", 1), batcher.submit("k", 2)
        assert gone.cancel()
        recorder.gate.set()
        assert kept.result(5) == ("k", 20)
        assert recorder.batches[-1] == ("k", [2])
        batcher.close()

    def test_an_idle_worker_exits_and_a_new_one_starts_on_demand(self):
        batcher = MicroBatcher(Recorder(), window_s=0.0, idle_exit_s=0.05)
        assert batcher("k", 1) == ("k", 10)
        deadline = time.monotonic() + 5
        while batcher._thread is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher._thread is None
        assert batcher("k", 2) == ("k", 20)
        batcher.close()
        with pytest.raises(Unavailable):
            batcher.submit("k", 3)

    def test_bad_parameters_are_refused(self):
        with pytest.raises(ValueError):
            MicroBatcher(Recorder(), max_batch=0)
        with pytest.raises(ValueError):
            MicroBatcher(Recorder(), window_s=-1)


# -- the model service and the endpoint ------------------------------------------------------

def images(n: int) -> list[bytes]:
    return [png_bytes((20 + 3 * i, 16 + i), ((37 * i) % 256, (91 * i) % 256, (53 * i + 20) % 256)) for i in range(n)]


@pytest.fixture
def ids(db, ctx, tiny_workspace):
    return dict(zip(["pcbm", "pcbm_h"], import_workspace(db, ctx, tiny_workspace), strict=True))


@pytest.fixture
def researcher(as_role):
    return as_role("researcher")


def test_batched_embeddings_equal_single_ones(ctx, ids):
    svc = ctx.models
    svc.batcher.window_s = 0.5  # every upload below lands in one batch
    entry = svc.get(ids["pcbm_h"])
    decoded = [open_image(data) for data in images(12)]
    futures = [svc.submit_image(entry, image) for image in decoded]
    batched = [f.result(30) for f in futures]
    assert svc.batcher.stats.largest_batch >= 8  # the first may run alone, the rest wait for company
    backbone = svc.backbone(entry.backbone_spec)
    for image, embedding in zip(decoded, batched, strict=True):
        assert embedding.shape == (1, backbone.embed_dim)
        torch.testing.assert_close(embedding, embed_images(backbone, [image]), rtol=0, atol=1e-5)


def test_batched_predictions_equal_unbatched_ones(ctx, ids):
    svc = ctx.models
    uploads = images(10)
    svc.batcher.max_batch = 1
    single = [inspect.predict_upload(svc, ids["pcbm_h"], data, top=5) for data in uploads]
    assert svc.batcher.stats.largest_batch == 1
    svc.batcher.max_batch, svc.batcher.window_s = 32, 0.5
    with ThreadPoolExecutor(len(uploads)) as pool:
        batched = list(pool.map(lambda data: inspect.predict_upload(svc, ids["pcbm_h"], data, top=5), uploads))
    assert svc.batcher.stats.largest_batch > 1
    for one, many in zip(single, batched, strict=True):
        assert one["predicted"] == many["predicted"] and one["explained_class"] == many["explained_class"]
        assert [c["concept"] for c in one["contributions"]] == [c["concept"] for c in many["contributions"]]
        for key in ("confidence", "logit", "bias", "residual"):
            assert many[key] == pytest.approx(one[key], abs=1e-5), key
        assert [s["score"] for s in many["concept_scores"]] == pytest.approx(
            [s["score"] for s in one["concept_scores"]], abs=1e-5)
        assert [p["probability"] for p in many["probabilities"]] == pytest.approx(
            [p["probability"] for p in one["probabilities"]], abs=1e-5)


def test_concurrent_api_uploads_are_batched_and_answered_each_with_its_own_result(client, ctx, ids, researcher):
    uploads = images(8)
    url = f"{BASE}/{ids['pcbm']}/predict"

    def post(data):
        return client.post(url, files={"image": ("x.png", data, "image/png")}, headers=researcher)

    single = [post(data).json() for data in uploads]
    ctx.models.batcher.window_s = 0.5
    with ThreadPoolExecutor(len(uploads)) as pool:
        responses = list(pool.map(post, uploads))
    assert [r.status_code for r in responses] == [200] * len(uploads)
    assert ctx.models.batcher.stats.largest_batch > 1
    for one, response in zip(single, responses, strict=True):
        many = response.json()
        assert (many["width"], many["height"], many["predicted"]) == (one["width"], one["height"], one["predicted"])
        assert many["confidence"] == pytest.approx(one["confidence"], abs=1e-5)


def test_a_full_upload_queue_is_503_with_retry_after_at_once(client, ctx, ids, researcher):
    batcher = ctx.models.batcher
    release = threading.Event()
    real_run = batcher.run_batch
    batcher.run_batch = lambda key, items: (release.wait(10), real_run(key, items))[1]
    batcher.max_pending = 1
    first = batcher.submit("blocker", torch.zeros(1))  # occupies the worker ...
    deadline = time.monotonic() + 5
    while batcher.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.submit("queued", torch.zeros(1))  # ... and this fills the queue
    try:
        start = time.monotonic()
        response = client.post(f"{BASE}/{ids['pcbm']}/predict", files={"image": ("x.png", png_bytes(), "image/png")},
                               headers=researcher)
        assert time.monotonic() - start < 5
        assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "unavailable"
    finally:
        release.set()
    first.exception(10)


def test_settings_reach_the_batcher(tmp_path, workspace):
    from app.context import build_context

    from .conftest import make_settings

    settings = make_settings(workspace, predict_batch_window_ms=12.5, predict_max_batch=7, predict_max_pending=9)
    ctx = build_context(settings)
    try:
        batcher = ctx.models.batcher
        assert (batcher.window_s, batcher.max_batch, batcher.max_pending) == (0.0125, 7, 9)
    finally:
        ctx.close()
