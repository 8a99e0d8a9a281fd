"""Throughput: the embedding pipeline against the bare forward pass, and micro-batched serving.

(a) **Pipeline efficiency.** For a backbone, the pure forward throughput (``encode_images``
    on pre-decoded tensors, batch by batch) against the full pipeline from image files on
    disk (:func:`ml.embed.embed_paths`: hashing, one decoding worker process, forward,
    cache shards). The two are timed alternately (ABBA over rounds) and the efficiency is
    the median of the per-round ratios pipeline / forward. Backbones: the demo backbone
    (``ml/demo/checkpoint``; when it is absent, the same architecture with random weights,
    said so in ``demo_backbone``) and a random ``ViT-B-32``. torch runs on one intra-op
    thread, as in the other benchmarks; ``vitb32_forward_img_s_2threads`` shows what two
    threads give on this machine.
(b) **Serving.** Real uvicorn servers on 127.0.0.1 serve the same small workspace (a
    PCBM on the demo backbone, or its stand-in): ``batched`` micro-batches uploads
    (``PCBM_PREDICT_MAX_BATCH=32``), ``unbatched`` does not (``=1``; uploads still run one
    at a time on the batcher's thread). A small asyncio client keeps ``c`` keep-alive
    connections busy with ``POST /api/v1/models/{id}/predict`` for a fixed time per
    concurrency c = 1, 8, 32, alternating between the servers slice by slice; requests/s
    and p50/p95 latency are reported for each. A second pair runs with
    ``OMP_NUM_THREADS=1`` (c = 32 only), because torch's intra-op threads decide how much
    batching gains on a small CPU (see docs/benchmarks.md).
(c) **Memory.** The peak resident set (``VmHWM``) of each server process after the load.

``python -m bench.throughput [--quick]`` prints JSON and a markdown table.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import machine, main, median

ROOT = Path(__file__).resolve().parents[1]
SECTION = "throughput"
CONCURRENCY = (1, 8, 32)
SECRET = "bench-secret-key-" + "s" * 32


# -- images ------------------------------------------------------------------------------------

def make_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """Smooth colour fields with noise, half PNG and half JPEG (quality 90), ``size`` pixels square."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) * (256.0 / size)
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        base = np.stack([xx * a, yy * b, (xx + yy) * c / 2], -1) + rng.uniform(0, 60, 3)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / (f"{i:05d}.png" if i % 2 else f"{i:05d}.jpg")
        Image.fromarray(pixels).save(path, **({} if i % 2 else {"quality": 90}))
        paths.append(path)
    return paths


def demo_images(folder: Path, n: int) -> list[Path]:
    """Images of the demo world (64 px PNG, as ``pcbm demo`` writes them): what the demo backbone embeds."""
    from ml.demo.world import default_config, generate_split

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(generate_split(default_config(), "test", n).images):
        path = folder / f"{i:05d}.png"
        Image.fromarray(pixels).save(path, format="PNG", compress_level=1)
        paths.append(path)
    return paths


# -- backbones ---------------------------------------------------------------------------------

def demo_backbone(tmp: Path, embed_dim: int | None = None) -> tuple[str, str]:
    """The demo backbone's spec and a label; its architecture with random weights when the
    checkpoint is absent (or when another ``embed_dim`` is asked for)."""
    from ml.backbone import DEMO_DIR

    if DEMO_DIR.is_dir() and embed_dim is None:
        return "demo", "demo checkpoint (ml/demo/checkpoint)"
    import open_clip
    from safetensors.torch import save_file

    from ml.demo.train_backbone import MODEL_CFG, preprocess_cfg

    config = json.loads(json.dumps(MODEL_CFG))
    if embed_dim is not None:
        config["embed_dim"] = embed_dim
    folder = tmp / f"demo-arch-{config['embed_dim']}"
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(**config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    size = config["vision_cfg"]["image_size"]
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config,
                                                              "preprocess_cfg": preprocess_cfg(size)}))
    why = "" if not DEMO_DIR.is_dir() else f", embed_dim {config['embed_dim']}"
    return (f"open_clip:local-dir:{folder}",
            f"demo architecture with random weights{why} (ml/demo/checkpoint absent)" if not why
            else f"demo architecture with random weights{why}")


# -- (a) pipeline efficiency -------------------------------------------------------------------

def pipeline_efficiency(spec: str, n: int, batch: int, rounds: int, tmp: Path, image_side: int | None) -> dict[str, Any]:
    """Forward-only vs full-pipeline images/s, alternated over ``rounds`` (ABBA)."""
    from ml.backbone import load_backbone
    from ml.data import open_image
    from ml.embed import embed_paths
    from ml.store import EmbeddingCache

    backbone = load_backbone(spec, device="cpu")
    folder = Path(tempfile.mkdtemp(dir=tmp, prefix="images-"))
    paths = make_images(folder, n, image_side) if image_side else demo_images(folder, n)
    decoded = torch.stack([backbone.preprocess(open_image(p)) for p in paths])
    caches = iter(range(10_000))

    def cpu_seconds() -> float:  # this process and its reaped children (the decoding workers)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    def forward() -> tuple[float, float]:
        cpu, start = cpu_seconds(), time.perf_counter()
        for chunk in decoded.split(batch):
            backbone.encode_images(chunk)
        return n / (time.perf_counter() - start), cpu_seconds() - cpu

    def pipeline() -> tuple[float, float]:
        cache = EmbeddingCache(folder / f"cache-{next(caches)}")  # empty: every image is decoded and computed
        cpu, start = cpu_seconds(), time.perf_counter()
        embed_paths(backbone, paths, cache=cache, batch_size=batch, num_workers=1)
        return n / (time.perf_counter() - start), cpu_seconds() - cpu

    backbone.encode_images(decoded[:batch])  # warm-up
    forwards, pipelines, ratios, cpu_ratios = [], [], [], []
    for r in range(rounds):
        if r % 2 == 0:
            (f, f_cpu), (p, p_cpu) = forward(), pipeline()
        else:
            (p, p_cpu), (f, f_cpu) = pipeline(), forward()
        forwards.append(f)
        pipelines.append(p)
        ratios.append(p / f)
        cpu_ratios.append(f_cpu / p_cpu)
    shutil.rmtree(folder, ignore_errors=True)
    return {"efficiency": median(ratios), "forward_img_s": median(forwards), "pipeline_img_s": median(pipelines),
            "ratios": [round(x, 3) for x in ratios], "cpu_efficiency": median(cpu_ratios),
            "images": n, "batch": batch,
            "image_side": image_side or "demo world (64 px PNG)",
            "input_side": backbone.image_size}


def forward_two_threads(spec: str, n: int, batch: int) -> float:
    from ml.backbone import load_backbone

    backbone = load_backbone(spec, device="cpu")
    decoded = torch.randn(n, 3, backbone.image_size, backbone.image_size)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        backbone.encode_images(decoded[:batch])
        start = time.perf_counter()
        for chunk in decoded.split(batch):
            backbone.encode_images(chunk)
        return n / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)


# -- (b) serving -------------------------------------------------------------------------------

def build_workspace(root: Path, spec: str, seed: int = 0) -> None:
    """A small served workspace: random embeddings in the backbone's space, 12 concepts, one PCBM."""
    from ml.backbone import load_backbone
    from ml.concepts import ConceptBank
    from ml.embed import EmbeddedDataset
    from ml.head import SparseLinearHead
    from ml.pcbm import PCBM
    from ml.workspace import Workspace

    backbone = load_backbone(spec, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    classes, concepts = ["circle", "square", "triangle", "star"], [f"concept {i}" for i in range(12)]
    n, d = 160, backbone.embed_dim
    embeddings = torch.randn(n, d, generator=gen)
    vectors = torch.nn.functional.normalize(torch.randn(len(concepts), d, generator=gen), dim=1)
    bank = ConceptBank(names=concepts, vectors=vectors, intercepts=torch.zeros(len(concepts)),
                       sources=["text"] * len(concepts), info=[{"phrase": c} for c in concepts],
                       backbone_identity=backbone.identity)
    labels = (bank.project(embeddings)[:, :len(classes)] + 0.5 * torch.randn(n, len(classes), generator=gen)).argmax(1)
    splits = ["train" if i < 120 else "test" for i in range(n)]
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    ids = [f"{s}/{classes[int(y)]}/img{i:04d}.png" for i, (s, y) in enumerate(zip(splits, labels, strict=True))]
    workspace = Workspace.open(root, create=True)
    embedded = EmbeddedDataset(embeddings, ids, labels, classes, splits, [None] * n, backbone.identity,
                               str(data.resolve()))
    path = workspace.new_path("embeddings", "bench", ".safetensors")
    embedded.save(path)
    workspace.datasets["bench"] = str(data.resolve())
    workspace.register("embeddings", "bench", path)
    bank_dir = workspace.new_path("banks", "concepts")
    bank.save(bank_dir)
    workspace.register("banks", "concepts", bank_dir)
    train = embedded.split("train")
    model = PCBM(bank, SparseLinearHead(lam=0.01, max_iter=300), classes).fit(train.embeddings, train.labels)
    model_dir = workspace.new_path("models", "pcbm")
    model.save(model_dir)
    workspace.register("models", "pcbm", model_dir)
    workspace.backbone = spec
    workspace.default_model = "pcbm"
    workspace.save()


def _token(workspace: Path) -> str:
    from app.db import make_engine, make_session_factory, session_scope
    from app.migrate import upgrade
    from app.services import users

    engine = make_engine(f"sqlite:///{workspace / 'pcbm.db'}")
    try:
        upgrade(engine)
        with session_scope(make_session_factory(engine)) as session:
            user = users.create_user(session, "bench", "researcher", None)
            _, plain = users.create_token(session, user, "bench")
            session.commit()
    finally:
        engine.dispose()
    return plain


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``uvicorn --factory app.main:create_app`` on 127.0.0.1 in its own process group."""

    def __init__(self, workspace: Path, token: str, env: dict[str, str]):
        self.workspace = workspace
        self.token = token
        self.port = _free_port()
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), "PCBM_WORKSPACE": str(workspace),
                    "PCBM_SECRET_KEY": SECRET, "PCBM_RUN_JOBS": "false", "PCBM_DEVICE": "cpu", **env}
        self.log = open(workspace / "server.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", "--no-access-log"],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {(self.workspace / 'server.log').read_text()[-2000:]}")
            if self.get("/readyz")[0] == 200:
                return
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def model_id(self) -> int:
        status, body = self.get("/api/v1/models")
        models = json.loads(body) if status == 200 else []
        return next(m["id"] for m in models if m["name"] == "pcbm")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()


def _request(port: int, path: str, token: str, image: bytes) -> bytes:
    boundary = "pcbm-bench-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(line.split(":", 1)[1]) for line in lines[1:] if line.lower().startswith("content-length:"))
    await reader.readexactly(length)
    return status


async def _drive(port: int, requests: list[bytes], concurrency: int, warmup_s: float, measure_s: float) -> dict:
    """Keep ``concurrency`` keep-alive connections busy (closed loop) for ``warmup_s + measure_s``;
    report the requests that completed inside the measuring window and their latencies."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    begin = time.perf_counter()
    start, end = begin + warmup_s, begin + warmup_s + measure_s

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (sent := time.perf_counter()) < end:
                status = await _exchange(reader, writer, requests[k % len(requests)])
                k += concurrency
                done = time.perf_counter()
                if start <= done <= end:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(done - sent)
        finally:
            writer.close()

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return {"ok": len(latencies), "seconds": measure_s, "latencies": latencies, "statuses": statuses}


def _summary(slices: list[dict]) -> dict[str, Any]:
    latencies = sorted(x for piece in slices for x in piece["latencies"])
    seconds = sum(piece["seconds"] for piece in slices)
    statuses: dict[str, int] = {}
    for piece in slices:
        for status, count in piece["statuses"].items():
            statuses[str(status)] = statuses.get(str(status), 0) + count

    def pct(q: float) -> float:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

    return {"rps": len(latencies) / seconds, "p50_ms": pct(0.50), "p95_ms": pct(0.95), "statuses": statuses}


def serving(spec: str, label: str, quick: bool, tmp: Path) -> dict[str, Any]:
    """Four servers (batched / unbatched, torch's default threads / one thread), measured in
    alternating slices so that they see the same machine load."""
    warmup_s = {1: 1.0, 8: 1.0, 32: 1.5} if quick else {1: 2.0, 8: 2.0, 32: 3.0}
    measure_s = {1: 2.0, 8: 2.0, 32: 3.0} if quick else {1: 5.0, 8: 5.0, 32: 6.0}
    rounds = {1: 1, 8: 1, 32: 2} if quick else {1: 2, 8: 2, 32: 4}
    images = [p.read_bytes() for p in make_images(tmp / "uploads", 16, 96, seed=1)]
    variants = {  # name: (max batch, environment)
        "batched": ("32", {}), "unbatched": ("1", {}),
        "batched_1thread": ("32", {"OMP_NUM_THREADS": "1"}), "unbatched_1thread": ("1", {"OMP_NUM_THREADS": "1"}),
    }
    servers: dict[str, Server] = {}
    slices: dict[tuple[str, int], list[dict]] = {}
    pairs: dict[str, list[float]] = {"default": [], "1thread": []}
    template = tmp / "served"
    build_workspace(template, spec)
    token = _token(template)  # migrated database with a researcher and an API token
    try:
        for name, (max_batch, env) in variants.items():
            workspace = tmp / f"served-{name}"
            shutil.copytree(template, workspace)
            servers[name] = Server(workspace, token, {"PCBM_PREDICT_MAX_BATCH": max_batch, "PCBM_PREDICT_BATCH_WINDOW_MS": "5",
                                               "PCBM_PREDICT_MAX_PENDING": "256", **env})
        for server in servers.values():
            server.wait_ready()
        requests = {}
        for name, server in servers.items():
            path = f"/api/v1/models/{server.model_id()}/predict?top=5"
            requests[name] = [_request(server.port, path, server.token, image) for image in images]
            asyncio.run(_drive(server.port, requests[name], 2, 0.0, 0.5))  # loads the backbone (lazily), untimed

        def measure(name: str, c: int) -> float:
            piece = asyncio.run(_drive(servers[name].port, requests[name], c, warmup_s[c], measure_s[c]))
            slices.setdefault((name, c), []).append(piece)
            return piece["ok"] / piece["seconds"]

        flip = False
        for c in CONCURRENCY:
            groups = [("batched", "unbatched", "default")]
            if c == 32:  # the one-thread servers only at the headline concurrency, to keep the run short
                groups.append(("batched_1thread", "unbatched_1thread", "1thread"))
            for _ in range(rounds[c]):
                for on, off, key in groups:
                    flip = not flip
                    first, second = (on, off) if flip else (off, on)  # alternate which goes first
                    got = {first: measure(first, c), second: measure(second, c)}
                    if c == 32:
                        pairs[key].append(got[on] / got[off] if got[off] else float("nan"))
        rss = {name: server.peak_rss_mb() for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    out: dict[str, Any] = {"serving_backbone": label}
    for (name, c), pieces in slices.items():
        summary = _summary(pieces)
        out[f"{name}_c{c}_rps"] = summary["rps"]
        out[f"{name}_c{c}_p50_ms"] = summary["p50_ms"]
        out[f"{name}_c{c}_p95_ms"] = summary["p95_ms"]
        if set(summary["statuses"]) - {"200"}:
            out[f"{name}_c{c}_statuses"] = summary["statuses"]
    out["batching_speedup_c32"] = out["batched_c32_rps"] / out["unbatched_c32_rps"] if out["unbatched_c32_rps"] \
        else float("nan")
    out["batching_speedup_c32_rounds"] = [round(x, 3) for x in pairs["default"]]
    out["batching_speedup_c32_1thread"] = (out["batched_1thread_c32_rps"] / out["unbatched_1thread_c32_rps"]
                                           if out["unbatched_1thread_c32_rps"] else float("nan"))
    out["batching_speedup_c32_1thread_rounds"] = [round(x, 3) for x in pairs["1thread"]]
    out["p95_ms_c32"] = out["batched_c32_p95_ms"]
    out["server_peak_rss_mb"] = rss["batched"]
    out["server_peak_rss_mb_by_server"] = {name: round(value, 1) for name, value in rss.items()}
    out["serving_slices"] = "; ".join(f"c{c}: {rounds[c]} x ({warmup_s[c]:g} s warm-up + {measure_s[c]:g} s)"
                                      for c in CONCURRENCY)
    return out


# -- the benchmark -----------------------------------------------------------------------------

def run(quick: bool = False) -> dict[str, dict[str, Any]]:
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="pcbm-throughput-"))
    try:
        spec, label = demo_backbone(tmp)
        out["demo_backbone"] = label
        if spec != "demo":
            notes.append("ml/demo/checkpoint is absent: the demo rows use its architecture with random weights "
                          "(the same compute)")
        demo = pipeline_efficiency(spec, n=256 if quick else 2048, batch=128, rounds=3 if quick else 5, tmp=tmp,
                                   image_side=None)
        vit = pipeline_efficiency("open_clip:ViT-B-32", n=24 if quick else 128, batch=12 if quick else 32,
                                  rounds=3 if quick else 5, tmp=tmp, image_side=256)
        out["pipeline_efficiency"] = vit["efficiency"]
        for prefix, values in (("vitb32", vit), ("demo", demo)):
            for key, value in values.items():
                out[f"{prefix}_{key}" if key != "efficiency" else f"{prefix}_pipeline_efficiency"] = value
        if not quick:
            out["vitb32_forward_img_s_2threads"] = forward_two_threads("open_clip:ViT-B-32", n=64, batch=32)
        out.update(serving(spec, label, quick, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["notes"] = "; ".join(notes) if notes else ""
    out["setup"] = ("pipeline: torch 1 intra-op thread + 1 decoding worker process, median of per-round ratios "
                    "(ABBA); serving: 4 uvicorn servers (max batch 32 vs 1, window 5 ms; torch's default threads "
                    "and OMP_NUM_THREADS=1), measured in alternating slices by an asyncio client on keep-alive "
                    "connections, 16 distinct 96 px PNG uploads")
    out["mode"] = "quick" if quick else "full"
    out["machine"] = machine()
    out["load_average"] = round(os.getloadavg()[0], 2)
    return {SECTION: out}


if __name__ == "__main__":
    main(run)
