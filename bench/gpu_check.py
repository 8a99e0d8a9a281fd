"""GPU check: a short, prepared script for sessions that are lent an accelerator.

    python -m bench.gpu_check [--quick] [--write]

What it checks (section ``gpu_check``, printed as JSON and a markdown table like the
other benchmarks; ``--write`` also merges it into ``bench/results.json``):

- **placement**: the backbone's parameters are on CUDA; ``encode_images`` returns float32
  on the CPU; the embedding pipeline hands the backbone batches already on the device
  (pinned uint8 batches, copied without blocking, normalised there).
- **agreement**: CUDA and CPU give the same concept scores, for a concept bank made of
  text embeddings of concept phrases: fp32 on CUDA within ``FP32_TOL`` of the CPU, and
  bf16 autocast (the default on CUDA) within ``BF16_TOL``, with the same top concept for
  at least ``TOP1_MIN`` of the images whose top concept leads by more than rounding could
  change. Embedding cosine similarities are reported too.
- **autocast speed-up**: forward images/s with fp32 and with bf16 autocast, batch 256.
- **embedding throughput**: the full pipeline from image files (decoding workers) against
  the pure forward pass on the GPU, i.e. the pipeline efficiency there.

Backbones: a random ``ViT-B-32`` and the demo backbone when ``ml/demo/checkpoint`` exists.
On a machine without CUDA it runs the CPU side of the same checks on a small scale and
reports ``cuda: "skipped (...)"``, so the script itself is tested everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench import machine, markdown_table, median

SECTION = "gpu_check"
FP32_TOL = 5e-3  # max |score difference| / score scale, CUDA fp32 vs CPU (cuDNN convs may use TF32)
BF16_TOL = 5e-2  # the same for bf16 autocast
TOP1_MIN = 0.9  # share of images whose top concept agrees between CUDA (bf16) and CPU
PHRASES = ["a red object", "a green object", "a blue object", "a yellow object", "a circle", "a square",
           "a triangle", "a star", "stripes", "dots", "water", "grass", "sand", "snow", "a small object",
           "a large object"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _backbones(spec: str | None) -> list[str]:
    if spec is not None:
        return [spec]
    from ml.backbone import DEMO_DIR

    return ["open_clip:ViT-B-32"] + (["demo"] if DEMO_DIR.is_dir() else [])


def _images(backbone, n: int, seed: int = 0) -> torch.Tensor:
    """Pre-decoded inputs: smooth random colour fields, normalised like real images would be."""
    gen = torch.Generator().manual_seed(seed)
    side = backbone.image_size
    low = torch.rand(n, 3, 8, 8, generator=gen)
    pixels = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
    return (pixels - 0.45) / 0.27


def _bank(backbone):
    from ml.concepts import ConceptBank

    vectors = torch.nn.functional.normalize(backbone.encode_texts(PHRASES), dim=1)
    return ConceptBank(names=list(PHRASES), vectors=vectors, intercepts=torch.zeros(len(PHRASES)),
                       sources=["text"] * len(PHRASES), info=[{"phrase": p} for p in PHRASES],
                       backbone_identity=backbone.identity)


def placement(backbone, device: torch.device, tmp: Path) -> dict[str, Any]:
    """Parameters on the device, float32 CPU outputs, and batches reaching the backbone on the device."""
    from ml.embed import embed_paths
    from ml.store import EmbeddingCache

    devices = {p.device.type for p in backbone.model.parameters()}
    out = backbone.encode_images(_images(backbone, 2))
    seen: list[tuple[str, str]] = []
    forward = backbone.encode_images

    def spy(images: torch.Tensor) -> torch.Tensor:
        seen.append((images.device.type, str(images.dtype)))
        return forward(images)

    folder = tmp / "placement"
    paths = _write_images(folder, 8, backbone.image_size)
    backbone.encode_images = spy
    try:
        embed_paths(backbone, paths, cache=EmbeddingCache(folder / "cache"), batch_size=4, num_workers=1)
    finally:
        del backbone.encode_images  # back to the class method
    ok = devices == {device.type} and out.device.type == "cpu" and out.dtype == torch.float32 \
        and bool(seen) and all(d == device.type for d, _ in seen)
    return {"ok": ok, "parameter_devices": sorted(devices), "output": f"{out.device.type}/{out.dtype}",
            "pipeline_batches_arrive_on": sorted({f"{d}/{t}" for d, t in seen})}


def agreement(spec: str, device: torch.device, n: int) -> dict[str, Any]:
    """Concept scores of the same images on the CPU (fp32) and on ``device`` (fp32 and autocast)."""
    from ml.backbone import load_backbone

    cpu = load_backbone(spec, device="cpu")
    images = _images(cpu, n, seed=1)
    bank = _bank(cpu)
    reference = cpu.encode_images(images)
    ref_scores = bank.project(reference)
    scale = float(ref_scores.abs().max()) or 1.0
    out: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        other = load_backbone_with(spec, device, precision)
        embeddings = other.encode_images(images)
        scores = bank.project(embeddings)
        diff = float((scores - ref_scores).abs().max()) / scale
        cosine = torch.nn.functional.cosine_similarity(embeddings, reference, dim=1)
        tol = FP32_TOL if precision == "fp32" else BF16_TOL
        same = scores.argmax(1) == ref_scores.argmax(1)
        top2 = ref_scores.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * scale  # a top concept that rounding cannot flip
        top1 = float(same[clear].float().mean()) if clear.any() else float("nan")
        out[precision] = {"max_rel_score_diff": diff, "min_cosine": float(cosine.min()),
                          "top1_agreement_all": float(same.float().mean()), "top1_agreement_clear": top1,
                          "clear_images": int(clear.sum()),
                          "ok": diff <= tol and (not clear.any() or top1 >= TOP1_MIN)}
    return out


def load_backbone_with(spec: str, device: torch.device, precision: str):
    """``load_backbone`` with a precision ("fp32" or "bf16"; "auto" is bf16 on CUDA)."""
    from ml.backbone import OpenClipBackbone, parse_backbone_spec

    parsed = parse_backbone_spec(spec)
    return OpenClipBackbone(parsed.model_name, parsed.pretrained, device=device, precision=precision)


def forward_speed(spec: str, device: torch.device, n: int, batch: int, repeats: int) -> dict[str, Any]:
    """Forward images/s with fp32 and with bf16 autocast (medians over repeats, interleaved)."""
    models = {p: load_backbone_with(spec, device, p) for p in (("fp32", "bf16") if device.type == "cuda"
                                                                 else ("fp32",))}
    for model in models.values():
        model.batch_size = batch
    images = _images(next(iter(models.values())), n, seed=2).to(device)
    times: dict[str, list[float]] = {p: [] for p in models}
    for model in models.values():
        model.encode_images(images[:batch])  # warm-up (kernels, autotuning)
    for _ in range(repeats):
        for precision, model in models.items():
            _sync(device)
            start = time.perf_counter()
            model.encode_images(images)
            _sync(device)
            times[precision].append(time.perf_counter() - start)
    out = {f"{p}_img_s": n / median(t) for p, t in times.items()}
    if "bf16" in out:
        out["bf16_speedup"] = out["bf16_img_s"] / out["fp32_img_s"]
    return out


def _write_images(folder: Path, n: int, side: int) -> list[Path]:
    from bench.throughput import make_images

    return make_images(folder, n, max(side + side // 7, 32))


def pipeline(spec: str, device: torch.device, n: int, batch: int, tmp: Path) -> dict[str, Any]:
    """The full pipeline from files against the pure forward pass (same backbone, same batch)."""
    from ml.backbone import load_backbone
    from ml.data import open_image
    from ml.embed import auto_workers, embed_paths
    from ml.store import EmbeddingCache

    backbone = load_backbone(spec, device=device)
    folder = tmp / f"pipeline-{abs(hash(spec))}"
    paths = _write_images(folder, n, backbone.image_size)
    decoded = torch.stack([backbone.preprocess(open_image(p)) for p in paths]).to(device)  # pure: already there
    backbone.encode_images(decoded[:batch])
    _sync(device)
    start = time.perf_counter()
    for chunk in decoded.split(batch):
        backbone.encode_images(chunk)
    _sync(device)
    forward = n / (time.perf_counter() - start)
    workers = auto_workers(n, batch, device)
    start = time.perf_counter()
    embed_paths(backbone, paths, cache=EmbeddingCache(folder / "cache"), batch_size=batch, num_workers=workers)
    full = n / (time.perf_counter() - start)
    shutil.rmtree(folder, ignore_errors=True)
    return {"forward_img_s": forward, "pipeline_img_s": full, "efficiency": full / forward, "workers": workers,
            "images": n, "batch": batch}


def run(quick: bool = False, spec: str | None = None) -> dict[str, dict[str, Any]]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
                           "torch": torch.__version__}
    if cuda:
        out["cuda"] = f"available: CUDA {torch.version.cuda}, capability {torch.cuda.get_device_capability(0)}"
        out["bf16_supported"] = torch.cuda.is_bf16_supported()
    else:
        out["cuda"] = "skipped (torch.cuda.is_available() is False): CPU-only checks at a small scale"
    checks: list[bool] = []
    tmp = Path(tempfile.mkdtemp(prefix="pcbm-gpu-check-"))
    try:
        for name in _backbones(spec):
            from ml.backbone import load_backbone

            key = "demo" if name == "demo" else name.split(":")[-1].split("/")[-1].lower().replace("-", "")
            key = key if len(key) <= 24 else "backbone"
            backbone = load_backbone(name, device=device)
            placed = placement(backbone, device, tmp)
            out[f"{key}_placement"] = placed
            checks.append(placed["ok"])
            if cuda:
                agreed = agreement(name, device, n=64 if quick else 256)
                out[f"{key}_agreement"] = agreed
                checks += [agreed["fp32"]["ok"], agreed["bf16"]["ok"]]
                out[f"{key}_forward"] = forward_speed(name, device, n=512 if quick else 2048, batch=256,
                                                      repeats=3 if quick else 5)
                out[f"{key}_pipeline"] = pipeline(name, device, n=1024 if quick else 4096, batch=256, tmp=tmp)
            else:
                out[f"{key}_forward"] = forward_speed(name, device, n=8, batch=8, repeats=1)
                out[f"{key}_pipeline"] = pipeline(name, device, n=16, batch=8, tmp=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    vit = out.get("vitb32_pipeline")
    if cuda and vit:
        out["pipeline_efficiency_cuda"] = vit["efficiency"]
        out["bf16_speedup_vitb32"] = out["vitb32_forward"].get("bf16_speedup")
    out["all_ok"] = all(checks)
    out["mode"] = "quick" if quick else "full"
    out["machine"] = machine()
    return {SECTION: out}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument("--backbone", help="check only this backbone spec (default: ViT-B-32 and the demo)")
    parser.add_argument("--write", action="store_true", help="merge the section into bench/results.json")
    args = parser.parse_args()
    sections = run(args.quick, args.backbone)
    print(json.dumps(sections, indent=2, sort_keys=True, default=str))
    print()
    print(markdown_table(sections))
    if args.write:
        from bench.run_all import write_results

        write_results(sections)
    return 0 if sections[SECTION]["all_ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
