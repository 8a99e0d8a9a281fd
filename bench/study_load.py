"""Study load: simulated participants act concurrently on a real server; no logged event may be lost.

``python -m bench.study_load [--seconds 120] [--participants 30] [--think-ms 100]`` builds a
small synthetic workspace, starts ``uvicorn --factory app.main:create_app`` on 127.0.0.1,
sets up and opens a study, and lets every participant join by invitation and then, until
the time is up, look at their task, a class's concepts and one concept, preview a prune,
commit it and undo it (each participant one request at a time, like a person). Then each
submits, the study is closed and the server is stopped with SIGTERM straight away, so
events still queued must be stored at shutdown.

Every request the server answers with a logged action counts as one event sent: 2xx and
the refusals participants' routes log (403/409/422); a 503 (every preview slot busy) is
refused before anything happens and logs nothing. After the server has exited, the
events in the database are counted per participant: ``lost`` must be 0. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-study-secret-" + "b" * 40
CLASSES = ["bird", "cat", "dog"]
CONCEPTS = ["feathers", "whiskers", "snout", "water", "grass", "wings", "paws", "sky"]
LOGGED_REFUSALS = {403, 409, 422}


# -- a small synthetic world (no image files: the study routes used here need none) -----------------

def build_workspace(root: Path, seed: int = 0) -> Path:
    import torch

    from ml.concepts import ConceptBank
    from ml.embed import EmbeddedDataset
    from ml.head import SparseLinearHead
    from ml.pcbm import PCBM
    from ml.workspace import Workspace

    generator = torch.Generator().manual_seed(seed)
    sizes = {"train": 300, "test": 150, "test_shifted": 150}
    dim = len(CONCEPTS) + 4
    rows, labels, splits, groups = [], [], [], []
    for split, count in sizes.items():
        for i in range(count):
            label = i % len(CLASSES)
            vector = 0.4 * torch.randn(dim, generator=generator)
            vector[label] += 1.0
            on_water = (label == 0) != (split == "test_shifted")
            vector[3 if on_water else 4] += 1.0
            rows.append(vector)
            labels.append(label)
            splits.append(split)
            groups.append("water" if on_water else "land")
    identity = "c" * 64
    workspace = Workspace.open(root, create=True)
    workspace.backbone = "demo"
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    ids = [f"{s}/{i:05d}.png" for i, s in enumerate(splits)]
    embedded = EmbeddedDataset(torch.stack(rows), ids, torch.tensor(labels), list(CLASSES), splits, groups,
                               identity, str(images))
    path = workspace.new_path("embeddings", "bench", ".safetensors")
    embedded.save(path)
    workspace.datasets["bench"] = str(images)
    workspace.register("embeddings", "bench", path)
    bank = ConceptBank(names=list(CONCEPTS), vectors=torch.eye(dim)[: len(CONCEPTS)], sources=["text"] * len(CONCEPTS),
                       info=[{"phrase": c} for c in CONCEPTS], backbone_identity=identity)
    weight = torch.zeros(len(CLASSES), len(CONCEPTS))
    weight[0, [0, 3, 5]] = torch.tensor([1.5, 2.0, 0.8])
    weight[1, [1, 4, 6]] = torch.tensor([1.5, 0.6, 0.7])
    weight[2, [2, 4, 6]] = torch.tensor([1.5, 0.7, 0.9])
    head = SparseLinearHead.from_state(
        {"weight": weight, "bias": torch.zeros(len(CLASSES)), "mean": torch.zeros(len(CONCEPTS)),
         "scale": torch.ones(len(CONCEPTS))},
        {"kind": "sparse_linear_head", "lam": 1e-3, "l1_ratio": 0.99, "standardize": True, "max_iter": 10,
         "tol": 1e-6})
    model_dir = workspace.new_path("models", "bench-pcbm")
    PCBM(bank, head, list(CLASSES)).save(model_dir)
    workspace.register("models", "bench-pcbm", model_dir)
    workspace.save()
    return root


# -- the server ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(workspace: Path, port: int, log_path: Path, database_url: str | None) -> subprocess.Popen:
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBM_")}
    env.update(PCBM_WORKSPACE=str(workspace), PCBM_SECRET_KEY=SECRET, PCBM_DEVICE="cpu", PYTHONPATH=str(ROOT))
    if database_url:
        env["PCBM_DATABASE_URL"] = database_url
    with log_path.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host",
                                    "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                   cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited early:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server did not become ready:\n{log_path.read_text()[-3000:]}")


def stop_server(process: subprocess.Popen) -> float:
    """SIGTERM and wait: the app's shutdown stores every queued event. Returns seconds taken."""
    start = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        raise RuntimeError("the server did not stop within 60 s of SIGTERM") from None
    return time.perf_counter() - start


# -- participants -------------------------------------------------------------------------------------

class Participant(threading.Thread):
    def __init__(self, base_url: str, code: str, stop_at: float, think_s: float, seed: int):
        super().__init__(daemon=True)
        self.base_url, self.code, self.stop_at, self.think_s = base_url, code, stop_at, think_s
        self.random = random.Random(seed)
        self.pseudonym = ""
        self.sent = 0  # events the server logged, by its answers
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.statuses: Counter[str] = Counter()
        self.error: str | None = None

    def _request(self, client, kind: str, method: str, url: str, **kwargs):
        start = time.perf_counter()
        response = client.request(method, url, **kwargs)
        self.latency[kind].append(time.perf_counter() - start)
        self.statuses[f"{kind} {response.status_code}"] += 1
        if 200 <= response.status_code < 300 or response.status_code in LOGGED_REFUSALS:
            self.sent += 1
        return response

    def run(self) -> None:
        import httpx

        try:
            with httpx.Client(base_url=self.base_url, timeout=60) as client:
                joined = self._request(client, "join", "POST", "/api/v1/studies/join",
                                       json={"code": self.code, "consent": True})
                joined.raise_for_status()
                self.pseudonym = joined.json()["pseudonym"]
                client.headers["Authorization"] = f"Bearer {joined.json()['token']}"
                while time.monotonic() < self.stop_at:
                    self._session(client)
                self._request(client, "submit", "POST", "/api/v1/studies/me/submit", json={})
        except Exception as exc:  # noqa: BLE001 - reported in the results, never hidden
            self.error = f"{type(exc).__name__}: {exc}"

    def _think(self) -> None:
        time.sleep(self.random.uniform(0.5, 1.5) * self.think_s)

    def _session(self, client) -> None:
        me = self._request(client, "page_view", "GET", "/api/v1/studies/me").json()
        self._think()
        class_name = self.random.choice(me["classes"])
        concepts = self._request(client, "class_view", "GET", "/api/v1/studies/me/concepts",
                                 params={"class": class_name}).json()["concepts"]
        self._think()
        candidates = [c["concept"] for c in concepts if not c["pruned"]]
        if not candidates:
            return
        concept = self.random.choice(candidates)
        self._request(client, "concept_inspect", "GET", "/api/v1/studies/me/concept", params={"concept": concept})
        self._think()
        body = {"base_version": me["version"], "prunes": [{"concept": concept, "class_name": class_name}]}
        self._request(client, "preview", "POST", "/api/v1/studies/me/preview", json=body)
        self._think()
        committed = self._request(client, "edit_commit", "POST", "/api/v1/studies/me/edits", json=body)
        self._think()
        if committed.status_code == 201:
            self._request(client, "edit_undo", "POST", "/api/v1/studies/me/undo",
                          json={"base_version": committed.json()["version"]})
            self._think()


# -- the run ------------------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def _settings(workspace: Path, database_url: str | None):
    from app.settings import Settings

    return Settings(workspace=workspace, secret_key=SECRET, **({"database_url": database_url} if database_url else {}))


def _set_up_study(workspace: Path, base_url: str, participants: int,
                  database_url: str | None) -> tuple[int, list[str], dict[str, str]]:
    import httpx

    from app.context import open_database
    from app.models import Role
    from app.services import users

    engine, factory = open_database(_settings(workspace, database_url))
    try:
        with factory() as session:
            user = users.create_user(session, "bench-researcher", Role.RESEARCHER)
            _, token = users.create_token(session, user, "bench")
    finally:
        engine.dispose()
    staff = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, timeout=60, headers=staff) as client:
        model = next(m for m in client.get("/api/v1/models").json() if m["name"] == "bench-pcbm")
        study = client.post("/api/v1/studies", json={
            "name": "load", "base_model_id": model["id"], "task": "Prune what does not belong.", "edit_budget": 3,
            "conditions": [{"name": "preview", "tools": ["preview"]}, {"name": "plain", "tools": []}],
        })
        study.raise_for_status()
        study_id = study.json()["id"]
        client.post(f"/api/v1/studies/{study_id}/open").raise_for_status()
        codes = client.post(f"/api/v1/studies/{study_id}/invitations", json={"count": participants}).json()["codes"]
    return study_id, codes, staff


def _stored(workspace: Path, study_id: int, database_url: str | None) -> Counter[str]:
    from sqlalchemy import func, select

    from app.context import open_database
    from app.models_studies import StudyEvent

    engine, factory = open_database(_settings(workspace, database_url))
    try:
        with factory() as session:
            rows = session.execute(select(StudyEvent.pseudonym, func.count()).where(StudyEvent.study_id == study_id)
                                   .group_by(StudyEvent.pseudonym))
            return Counter(dict(rows.all()))
    finally:
        engine.dispose()


def measure(seconds: float, participants: int = 30, think_ms: float = 100.0,
            database_url: str | None = None, keep: bool = False) -> dict[str, Any]:
    import httpx

    from app.db import make_engine
    from app.migrate import upgrade

    folder = Path(tempfile.mkdtemp(prefix="pcbm-study-load-"))
    try:
        workspace = build_workspace(folder / "ws")
        engine = make_engine(database_url or f"sqlite:///{workspace / 'pcbm.db'}")
        upgrade(engine)
        engine.dispose()
        port = _free_port()
        base_url = f"http://127.0.0.1:{port}"
        server = start_server(workspace, port, folder / "server.log", database_url)
        try:
            study_id, codes, staff = _set_up_study(workspace, base_url, participants, database_url)
            start = time.monotonic()
            people = [Participant(base_url, code, start + seconds, think_ms / 1000, seed)
                      for seed, code in enumerate(codes)]
            for person in people:
                person.start()
            for person in people:
                person.join(seconds + 300)
            elapsed = time.monotonic() - start
            httpx.post(f"{base_url}/api/v1/studies/{study_id}/close", headers=staff, timeout=60).raise_for_status()
        finally:
            shutdown_s = stop_server(server)
        stored = _stored(workspace, study_id, database_url)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    sent = {p.pseudonym: p.sent for p in people if p.pseudonym}
    latency = defaultdict(list)
    statuses: Counter[str] = Counter()
    for person in people:
        for kind, values in person.latency.items():
            latency[kind].extend(values)
        statuses.update(person.statuses)
    every = [v for values in latency.values() for v in values]
    lost = sum(max(0, sent[p] - stored.get(p, 0)) for p in sent)
    extra = sum(max(0, stored.get(p, 0) - sent[p]) for p in sent)
    return {
        "participants": participants, "seconds": round(elapsed, 1), "think_ms": think_ms,
        "database": "postgresql" if database_url and database_url.startswith("postgresql") else "sqlite",
        "requests": len(every), "requests_per_s": round(len(every) / elapsed, 1),
        "events_sent": sum(sent.values()), "events_stored": sum(stored.get(p, 0) for p in sent),
        "lost": lost, "unexpected_extra": extra,
        "participant_errors": [p.error for p in people if p.error],
        "p50_ms": round(1000 * statistics.median(every), 1) if every else None,
        "p95_ms": round(1000 * _percentile(every, 0.95), 1) if every else None,
        "p95_ms_by_action": {k: round(1000 * _percentile(v, 0.95), 1) for k, v in sorted(latency.items())},
        "statuses": dict(sorted(statuses.items())), "shutdown_s": round(shutdown_s, 2),
    }


def run(quick: bool = False) -> dict[str, dict[str, Any]]:
    """For bench.run_all: 30 participants for 120 s (15 s with ``quick``)."""
    from bench import machine

    result = measure(15 if quick else 120)
    result.pop("statuses")
    result.pop("p95_ms_by_action")
    result["participant_errors"] = len(result["participant_errors"])
    result["mode"] = "quick" if quick else "full"
    result["machine"] = machine()
    return {"study_load": result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long participants act (default 120)")
    parser.add_argument("--participants", type=int, default=30, help="how many act at once (default 30)")
    parser.add_argument("--think-ms", type=float, default=100.0, help="mean pause between a participant's actions")
    parser.add_argument("--database-url", default=None, help="e.g. postgresql+psycopg://... (default: SQLite)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace and server log")
    args = parser.parse_args()
    result = measure(args.seconds, args.participants, args.think_ms, args.database_url, args.keep)
    print(json.dumps(result, indent=2))
    return 0 if result["lost"] == 0 and not result["participant_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
