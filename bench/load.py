"""Load on loopback: simulated researchers browse, preview and commit edits on a real server.

The real app (``uvicorn --factory app.main:create_app``, one process, as ``pcbm serve``
runs it) serves a copy of the tiny workspace of the tests (two models, 198 images).
Each simulated user is a thread with its own API token and connection that repeats, with
a think time of 0.3-1.5 s, a weighted choice of what a researcher does: list models, read
concept weights, page through images, open thumbnails and image details, load the model
page (HTML), read the history, preview edits, and now and then commit one (on the version
they last saw, so commits race each other) or diff two versions.

Reported per route: requests, p50/p95/max latency (ms); overall: requests per second,
``errors`` (transport failures, 5xx other than 503, unexpected 4xx: expected 0),
``conflicts_409`` (a commit on a version someone else moved: expected, counted apart)
and ``shed_503`` (overload answered with Retry-After).

    python -m bench.load [--users 50] [--duration 180] [--quick]   # quick: 20 s

``make load`` runs the full mode and merges a ``load`` section into bench/results.json;
``bench.run_all`` runs it too (quick: 20 s).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

CONCEPTS = ["feathers", "whiskers", "snout", "water", "grass", "wings", "paws", "beak", "stripes", "sky"]
CLASSES = ["bird", "cat", "dog"]
THINK_S = (0.3, 1.5)


class Recorder:
    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.conflicts = 0
        self.shed = 0
        self.lock = threading.Lock()

    def record(self, route: str, seconds: float, response: httpx.Response | None, error: str | None = None,
               allow_409: bool = False) -> None:
        with self.lock:
            self.latencies[route].append(seconds)
            if response is None:
                self.errors.append(f"{route}: {error}")
            elif response.status_code == 409 and allow_409:
                self.conflicts += 1
            elif response.status_code == 503 and response.headers.get("Retry-After"):
                self.shed += 1
            elif response.status_code >= 400:
                self.errors.append(f"{route}: {response.status_code} {response.text[:120]}")


class User:
    """One simulated researcher."""

    def __init__(self, url: str, token: str, models: list[dict], image_ids: list[str], recorder: Recorder,
                 rng: random.Random):
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.models, self.image_ids, self.recorder, self.rng = models, image_ids, recorder, rng
        self.seen_version: dict[int, int] = {m["id"]: m["head_version"] for m in models}
        self.actions = [  # (weight, action)
            (10, self.list_models), (14, self.concepts), (12, self.images), (20, self.thumbnail),
            (8, self.detail), (6, self.model_page), (6, self.history), (14, self.preview), (4, self.commit),
            (3, self.diff),
        ]

    def call(self, route: str, method: str, url: str, allow_409: bool = False, **kwargs) -> httpx.Response | None:
        started = time.perf_counter()
        try:
            response = self.client.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            self.recorder.record(route, time.perf_counter() - started, None, f"{type(exc).__name__}: {exc}")
            return None
        self.recorder.record(route, time.perf_counter() - started, response, allow_409=allow_409)
        return response

    def model(self) -> dict:
        return self.rng.choice(self.models)

    def edits(self) -> list[dict]:
        chosen = []
        for _ in range(self.rng.randint(1, 3)):
            edit = {"op": self.rng.choice(["prune", "scale", "prune_normalize"]), "concept": self.rng.choice(CONCEPTS)}
            if edit["op"] == "scale":
                edit["value"] = round(self.rng.uniform(0.3, 2.0), 2)
            if self.rng.random() < 0.5:
                edit["class_name"] = self.rng.choice(CLASSES)
            chosen.append(edit)
        return chosen

    def list_models(self) -> None:
        response = self.call("GET /api/v1/models", "GET", "/api/v1/models")
        if response is not None and response.status_code == 200:
            for m in response.json():
                self.seen_version[m["id"]] = m["head_version"]

    def concepts(self) -> None:
        m = self.model()
        self.call("GET /api/v1/models/{id}/concepts", "GET", f"/api/v1/models/{m['id']}/concepts",
                  params={"class": self.rng.choice(CLASSES)})

    def images(self) -> None:
        m = self.model()
        self.call("GET /api/v1/models/{id}/images", "GET", f"/api/v1/models/{m['id']}/images",
                  params={"page": self.rng.randint(1, 2), "per_page": 24})

    def thumbnail(self) -> None:
        m = self.model()
        self.call("GET /api/v1/models/{id}/images/file", "GET", f"/api/v1/models/{m['id']}/images/file",
                  params={"id": self.rng.choice(self.image_ids), "size": 96})

    def detail(self) -> None:
        m = self.model()
        self.call("GET /api/v1/models/{id}/images/detail", "GET", f"/api/v1/models/{m['id']}/images/detail",
                  params={"id": self.rng.choice(self.image_ids)})

    def model_page(self) -> None:
        self.call("GET /models/{model} (HTML)", "GET", f"/models/{self.model()['id']}")

    def history(self) -> None:
        m = self.model()
        response = self.call("GET /api/v1/models/{id}/versions", "GET", f"/api/v1/models/{m['id']}/versions")
        if response is not None and response.status_code == 200 and response.json():
            self.seen_version[m["id"]] = response.json()[-1]["number"]

    def preview(self) -> None:
        m = self.model()
        response = self.call("POST /api/v1/models/{id}/preview", "POST", f"/api/v1/models/{m['id']}/preview",
                             allow_409=True, json={"base_version": self.seen_version[m["id"]], "edits": self.edits()})
        self._follow(m, response)

    def commit(self) -> None:
        m = self.model()
        response = self.call("POST /api/v1/models/{id}/edits", "POST", f"/api/v1/models/{m['id']}/edits",
                             allow_409=True, json={"base_version": self.seen_version[m["id"]], "edits": self.edits(),
                                                   "message": "load test"})
        if response is not None and response.status_code == 201:
            self.seen_version[m["id"]] = response.json()["number"]
        self._follow(m, response)

    def diff(self) -> None:
        m = self.model()
        self.call("GET /api/v1/models/{id}/diff", "GET", f"/api/v1/models/{m['id']}/diff",
                  params={"from_version": 1, "to_version": self.seen_version[m["id"]]})

    def _follow(self, model: dict, response: httpx.Response | None) -> None:
        """After a 409, look at the model again, as a person would."""
        if response is not None and response.status_code == 409:
            current = response.json()["error"]["detail"]["current_version"]
            if current:
                self.seen_version[model["id"]] = current["number"]

    def run(self, deadline: float) -> None:
        weights = [w for w, _ in self.actions]
        with self.client:
            while time.monotonic() < deadline:
                self.rng.choices([a for _, a in self.actions], weights)[0]()
                time.sleep(self.rng.uniform(*THINK_S))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(users: int = 50, duration_s: float = 180.0, seed: int = 0, root: Path | None = None) -> dict[str, Any]:
    from ml.embed import EmbeddedDataset
    from tests.reliability.harness import Server, build_tiny_workspace, prepare_workspace

    with tempfile.TemporaryDirectory(prefix="load-") as scratch:
        base = Path(root or scratch)
        source = build_tiny_workspace(base / "source")
        prepared = prepare_workspace(source, base / "served" / "ws",
                                     {f"user{i:02d}": "researcher" for i in range(users)})
        image_ids = EmbeddedDataset.load(prepared.workspace / "embeddings" / "toy.safetensors").image_ids
        with Server(prepared.workspace) as server:
            server.start()
            server.wait_ready()
            models = httpx.get(f"{server.url}/api/v1/models", headers=prepared.headers("user00"), timeout=60).json()
            recorder = Recorder()
            rng = random.Random(seed)
            started = time.monotonic()
            deadline = started + duration_s
            threads = [threading.Thread(target=User(server.url, prepared.tokens[f"user{i:02d}"], models, image_ids,
                                                    recorder, random.Random(rng.random())).run, args=(deadline,))
                       for i in range(users)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(duration_s + 300)
            elapsed = time.monotonic() - started
            alive = server.process is not None and server.process.poll() is None
            versions = httpx.get(f"{server.url}/api/v1/models/{models[0]['id']}/versions",
                                 headers=prepared.headers("user00"), timeout=60).json() if alive else []
    total = sum(len(v) for v in recorder.latencies.values())
    routes = {route: {"requests": len(values), "p50_ms": round(1000 * statistics.median(values), 1),
                      "p95_ms": round(1000 * percentile(values, 0.95), 1), "max_ms": round(1000 * max(values), 1)}
              for route, values in sorted(recorder.latencies.items())}
    every = [v for values in recorder.latencies.values() for v in values]
    return {
        "users": users, "duration_s": round(elapsed, 1), "think_time_s": list(THINK_S), "requests": total,
        "requests_per_s": round(total / elapsed, 1), "errors": len(recorder.errors),
        "error_samples": recorder.errors[:10], "conflicts_409": recorder.conflicts, "shed_503": recorder.shed,
        "p50_ms": round(1000 * statistics.median(every), 1) if every else None,
        "p95_ms": round(1000 * percentile(every, 0.95), 1) if every else None,
        "server_alive_after": alive, "versions_of_first_model_after": len(versions), "routes": routes,
    }


def run(quick: bool) -> dict[str, dict[str, Any]]:
    """For bench.run_all: 50 users for 20 s (quick) or 180 s."""
    return {"load": run_load(50, 20.0 if quick else 180.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    parser.add_argument("--quick", action="store_true", help="20 seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="do not merge the result into bench/results.json")
    args = parser.parse_args()
    result = run_load(args.users, 20.0 if args.quick else args.duration, args.seed)
    print(json.dumps(result, indent=2))
    if not args.no_save:
        from bench.run_all import write_results

        write_results({"load": {**result, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}})
    return 1 if result["errors"] or not result["server_alive_after"] else 0


if __name__ == "__main__":
    sys.exit(main())
