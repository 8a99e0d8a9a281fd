"""The embedding pipeline survives a real crash: kill -9 halfway, rerun, nothing saved is recomputed.

The embedding runs in a child process (with a decoding worker process of its own) that
logs how many images each forward pass computed. The test waits until some cache shards
are on disk, kills the whole process group with SIGKILL, counts what the cache kept, and
reruns: the rerun must compute exactly the images that were not saved, and give the same
embeddings as an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ml.backbone import load_backbone
from ml.data import open_image
from ml.embed import _pixel_stages, auto_workers, embed_paths
from ml.store import EmbeddingCache, load_meta, load_tensors

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1},
}
N_IMAGES, BATCH = 48, 4

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from ml.backbone import load_backbone
    from ml.embed import embed_paths
    from ml.store import EmbeddingCache, save_tensors

    folder, cache_dir, log, out, delay, batch = sys.argv[1:7]
    paths = sorted(Path(sys.argv[7]).glob("*.*"))
    backbone = load_backbone(f"open_clip:local-dir:{folder}", device="cpu")
    forward = backbone.encode_images

    def counting(images):
        result = forward(images)
        with open(log, "a") as handle:  # one line per forward pass: how many images it computed
            handle.write(f"{len(images)}\\n")
        time.sleep(float(delay))  # slow enough to be killed halfway
        return result

    backbone.encode_images = counting
    vectors = embed_paths(backbone, paths, cache=EmbeddingCache(cache_dir), batch_size=int(batch), num_workers=1)
    save_tensors(out, {"embeddings": vectors})
""")


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in open_clip.CLIP(**TINY).state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i in range(N_IMAGES):
        image = Image.new("RGB", (40 + i % 7, 30 + i % 5), ((11 * i) % 256, (57 * i) % 256, (101 * i) % 256))
        image.save(folder / (f"{i:03d}.png" if i % 3 else f"{i:03d}.jpg"))
    return folder


def run_child(backbone_dir, images, cache, log, out, delay):
    script = cache.parent / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(script), str(backbone_dir), str(cache), str(log), str(out),
                             str(delay), str(BATCH), str(images)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def computed(log: Path) -> int:
    return sum(int(line) for line in log.read_text().split()) if log.exists() else 0


def saved_keys(cache: Path) -> set[str]:
    keys: set[str] = set()
    for shard in cache.rglob("shard-*.safetensors"):
        keys.update(load_meta(shard)["keys"])
    return keys


@pytest.mark.slow
def test_a_killed_run_resumes_without_recomputing_what_was_saved(tmp_path, backbone_dir, images):
    cache, first_log, second_log = tmp_path / "cache", tmp_path / "first.log", tmp_path / "second.log"
    child = run_child(backbone_dir, images, cache, first_log, tmp_path / "first.safetensors", delay=0.4)
    try:
        deadline = time.monotonic() + 120
        while len(list(cache.rglob("shard-*.safetensors"))) < 3:
            assert child.poll() is None, child.communicate()[0].decode()
            assert time.monotonic() < deadline, "the child never wrote a shard"
            time.sleep(0.05)
        assert child.poll() is None, "the run finished before it could be killed"
        os.killpg(child.pid, signal.SIGKILL)  # the child and its decoding worker, no clean-up
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "first.safetensors").exists()
    saved = saved_keys(cache)
    killed_after = computed(first_log)
    assert 3 * BATCH <= len(saved) < N_IMAGES and killed_after >= len(saved)

    rerun = run_child(backbone_dir, images, cache, second_log, tmp_path / "second.safetensors", delay=0.0)
    output = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, output
    assert computed(second_log) == N_IMAGES - len(saved), "the rerun recomputed saved images (or skipped some)"
    assert len(saved_keys(cache)) == N_IMAGES

    backbone = load_backbone(f"open_clip:local-dir:{backbone_dir}", device="cpu")
    reference = embed_paths(backbone, sorted(images.glob("*.*")), batch_size=N_IMAGES)
    resumed = load_tensors(tmp_path / "second.safetensors")[0]["embeddings"]
    torch.testing.assert_close(resumed, reference, rtol=1e-4, atol=1e-5)


def test_the_pipeline_pixels_are_exactly_the_backbone_preprocessing(backbone_dir, images):
    backbone = load_backbone(f"open_clip:local-dir:{backbone_dir}", device="cpu")
    stages = _pixel_stages(backbone)
    assert stages is not None
    decoded = [open_image(p) for p in sorted(images.glob("*.*"))[:6]]
    decoded += [decoded[0].convert("L"), decoded[1].resize((97, 13))]
    expected = torch.stack([backbone.preprocess(image) for image in decoded])
    uint8 = torch.stack([stages.to_uint8(image) for image in decoded])
    assert uint8.dtype == torch.uint8
    assert torch.equal(stages.normalise(uint8), expected)


def test_worker_processes_and_the_background_writer_give_the_same_vectors(tmp_path, backbone_dir, images):
    backbone = load_backbone(f"open_clip:local-dir:{backbone_dir}", device="cpu")
    paths = sorted(images.glob("*.*"))
    serial = embed_paths(backbone, paths, batch_size=5)
    seen = []
    parallel = embed_paths(backbone, paths, cache=EmbeddingCache(tmp_path / "c"), batch_size=5, num_workers=2,
                           progress=lambda done, total: seen.append(done))
    torch.testing.assert_close(parallel, serial, rtol=1e-4, atol=1e-5)
    assert seen == sorted(seen) and seen[-1] == N_IMAGES
    assert len(saved_keys(tmp_path / "c")) == N_IMAGES  # the writer flushed every shard before returning
    again = embed_paths(backbone, paths, cache=EmbeddingCache(tmp_path / "c"), num_workers=None)
    assert torch.equal(again, parallel)


def test_automatic_worker_count():
    assert auto_workers(10, 64, "cpu") == 0  # a few batches: not worth a process
    cores = os.cpu_count() or 1
    assert auto_workers(10_000, 64, "cpu") == (1 if cores > 1 else 0)
    assert auto_workers(10_000, 64, "cuda") == max(1, min(8, cores - 1))


def test_the_gpu_check_runs_on_a_cpu_and_says_cuda_was_skipped(backbone_dir, monkeypatch):
    from bench import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    section = gpu_check.run(quick=True, spec=f"open_clip:local-dir:{backbone_dir}")["gpu_check"]
    assert section["cuda"].startswith("skipped")
    assert section["all_ok"] is True and section["device"] == "cpu"
    placement = next(v for k, v in section.items() if k.endswith("_placement"))
    assert placement["parameter_devices"] == ["cpu"] and placement["output"] == "cpu/torch.float32"
    assert placement["pipeline_batches_arrive_on"] == ["cpu/torch.float32"]
    pipeline = next(v for k, v in section.items() if k.endswith("_pipeline"))
    assert pipeline["images"] == 16 and pipeline["pipeline_img_s"] > 0
    json.dumps(section)  # printable as the benchmarks' JSON
