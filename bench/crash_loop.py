"""Crash consistency: ``kill -9`` the server while edits are being committed, restart, check.

Each iteration starts the real app (uvicorn on a loopback socket), lets a few clients
commit edits, undos and reverts as fast as they can on both models of a served tiny
workspace, kills the server with SIGKILL after a random delay (no cleanup of any kind
runs), restarts it and checks, with the server up again:

- ``PRAGMA integrity_check`` is ``ok`` and ``PRAGMA foreign_key_check`` finds nothing;
- the schema is at the migration head;
- each model's versions are numbered 1..N with no gap, each version's parent is the one
  before it, and the model's head pointer and number name version N;
- every version has its weights artifact (its content hash verified) and exactly one
  audit event recording it, and no audit event records a version that does not exist;
- every commit the server acknowledged (201) is there with its message, no commit is
  there twice, and the restarted server serves the head's weights.

So each edit is wholly present (row, head move, artifact, audit event) or wholly absent.
Unreferenced artifact files from killed transactions are allowed: the store's garbage
collector removes them.

Restarts: ``fork`` (default) keeps a "zygote" process that has imported the app once and
forks a fresh server for each start: the server is still a separate process, killed with
SIGKILL, whose app, database connections and model caches are new; only Python's import
time is saved. ``exec`` starts ``python -m uvicorn`` from scratch each time.

    python -m bench.crash_loop [--iterations 200] [--restart fork|exec] [--seed 0]

``make crash-loop`` runs 200 iterations and merges a ``crash_loop`` section into
bench/results.json; the test suite runs 20 (tests/reliability/test_crash_consistency.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

CONCEPTS = ["feathers", "whiskers", "snout", "water", "grass", "wings", "paws", "beak", "stripes", "sky"]
CLIENTS = 3
VERSION_ACTIONS = {"model.create", "model.edit", "model.undo", "model.revert"}  # the audit events of a version


# -- the server: exec or fork from a zygote ------------------------------------------------------

class ForkingServer:
    """Servers forked from a zygote that imported the app once; same interface as ``Server``."""

    def __init__(self, workspace: Path, env: dict[str, str] | None = None):
        from tests.reliability.harness import ROOT, listening_socket, server_env

        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(workspace).parent / "server.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - open for the zygote's lifetime
        self.zygote = subprocess.Popen(
            [sys.executable, "-m", "bench.crash_loop", "--zygote", str(self.sock.fileno())], cwd=ROOT,
            env=server_env(Path(workspace), env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, pass_fds=(self.sock.fileno(),), text=True)
        self.pid: int | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.zygote.stdin and self.zygote.stdout
        self.zygote.stdin.write("spawn\n")
        self.zygote.stdin.flush()
        line = self.zygote.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the zygote did not fork a server ({line!r}):\n{self.log_tail()}")
        self.pid = int(line)
        self.starts += 1

    def alive(self) -> bool:
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 30
            while self.alive() and time.monotonic() < deadline:  # the zygote reaps it
                time.sleep(0.01)
            self.pid = None

    def wait_ready(self, timeout: float = 240.0) -> list[int]:
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"the server died while starting:\n{self.log_tail()}")
                try:
                    status = client.get("/readyz").status_code
                except httpx.HTTPError:
                    status = 0
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == 200:
                    return seen
                time.sleep(0.02)
        raise TimeoutError(f"not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        self.kill()
        if self.zygote.poll() is None:
            self.zygote.stdin.close()
            try:
                self.zygote.wait(30)
            except subprocess.TimeoutExpired:
                self.zygote.kill()
        self._log.close()
        self.sock.close()


def zygote(fd: int) -> None:
    """Import the app, then fork one uvicorn server per "spawn" line on stdin; print its pid."""
    import uvicorn

    from app.main import create_app  # the expensive imports, done once

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    for line in sys.stdin:
        if line.strip() != "spawn":
            continue
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            sys.stdin.close()
            os.dup2(sys.stderr.fileno(), 1)  # the parent reads pids from stdout: keep it clean
            try:
                config = uvicorn.Config(create_app(), fd=fd, log_level="warning", access_log=False)
                uvicorn.Server(config).run()
            finally:
                os._exit(0)
        print(pid, flush=True)


# -- the clients ---------------------------------------------------------------------------------

@dataclass
class Ledger:
    """What the clients sent and what the server said; shared by the client threads."""

    acknowledged: dict[str, tuple[int, int]] = field(default_factory=dict)  # message -> (model, number)
    unknown: set[str] = field(default_factory=set)  # sent, no answer (the kill)
    conflicts: int = 0
    refused: int = 0
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def client_loop(url: str, token: str, models: list[int], ledger: Ledger, stop: threading.Event,
                rng: random.Random, tag: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    n = 0
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        while not stop.is_set():
            model = rng.choice(models)
            try:
                head = client.get(f"/api/v1/models/{model}").json()["head_version"]
            except (httpx.HTTPError, KeyError, ValueError):
                return
            n += 1
            message = f"{tag}-{n}"
            roll = rng.random()
            if roll < 0.1 and head > 1:
                path, body = "undo", {"base_version": head, "message": message}
            elif roll < 0.2 and head > 1:
                path, body = "revert", {"base_version": head, "to_version": rng.randint(1, head - 1), "message": message}
            else:
                concept = rng.choice(CONCEPTS)
                edit = ({"op": "scale", "concept": concept, "value": round(rng.uniform(0.5, 1.5), 3)}
                        if rng.random() < 0.7 else {"op": "prune", "concept": concept})
                path, body = "edits", {"base_version": head, "edits": [edit], "message": message}
            with ledger.lock:
                ledger.in_flight += 1
                ledger.unknown.add(message)
            try:
                response = client.post(f"/api/v1/models/{model}/{path}", json=body)
            except httpx.HTTPError:
                return  # the server is gone; the outcome of this one is unknown
            finally:
                with ledger.lock:
                    ledger.in_flight -= 1
            with ledger.lock:
                ledger.unknown.discard(message)
                if response.status_code == 201:
                    ledger.acknowledged[message] = (model, response.json()["number"])
                elif response.status_code == 409:
                    ledger.conflicts += 1
                else:
                    ledger.refused += 1


# -- the checks ----------------------------------------------------------------------------------

def check_database(workspace: Path, ledger: Ledger | None = None) -> list[str]:
    """Every property of the module docstring that the files on disk can show; [] when all hold."""
    from app.db import make_engine
    from app.errors import AppError
    from app.migrate import check_database as schema_at_head
    from app.services.artifacts import ArtifactStore
    from ml.errors import PCBMError

    problems: list[str] = []
    database = workspace / "pcbm.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchall()
        if integrity != [("ok",)]:
            problems.append(f"integrity_check: {integrity[:5]}")
        dangling = db.execute("PRAGMA foreign_key_check").fetchall()
        if dangling:
            problems.append(f"foreign_key_check: {dangling[:5]}")
        models = db.execute("SELECT id, head_number, head_version_id FROM models").fetchall()
        versions = db.execute("SELECT id, model_id, number, parent_id, weights_hash, artifact_key, message "
                              "FROM model_versions ORDER BY model_id, number").fetchall()
        events = db.execute("SELECT object_id, action, payload FROM audit_events WHERE object_type = 'model'").fetchall()
    engine = make_engine(f"sqlite:///{database}")
    try:
        schema_at_head(engine)
    except AppError as exc:
        problems.append(f"migrations: {exc.message}")
    finally:
        engine.dispose()

    store = ArtifactStore(workspace / "artifacts")
    by_model: dict[int, list[tuple]] = {}
    for row in versions:
        by_model.setdefault(row[1], []).append(row)
    recorded: dict[tuple[int, int], list[str]] = {}
    for object_id, action, payload in events:
        if action not in VERSION_ACTIONS:
            continue
        data = json.loads(payload) if isinstance(payload, str) else payload
        number = 1 if action == "model.create" else data.get("version")
        recorded.setdefault((int(object_id), number), []).append(data.get("weights_hash"))
    for model_id, head_number, head_version_id in models:
        rows = by_model.get(model_id, [])
        numbers = [r[2] for r in rows]
        if numbers != list(range(1, len(rows) + 1)):
            problems.append(f"model {model_id}: version numbers {numbers[:3]}...{numbers[-3:]} are not 1..N")
        if head_number != len(rows) or (rows and head_version_id != rows[-1][0]):
            problems.append(f"model {model_id}: head {head_number}/{head_version_id} is not version {len(rows)}")
        for before, row in zip(rows, rows[1:], strict=False):
            if row[3] != before[0]:
                problems.append(f"model {model_id} v{row[2]}: parent is not v{before[2]}")
        for _, _, number, _, weights_hash, key, _ in rows:
            hashes = recorded.pop((model_id, number), [])
            if hashes != [weights_hash]:
                problems.append(f"model {model_id} v{number}: audit events {hashes}, expected one for {weights_hash[:12]}")
            try:
                store.get(key, expected_sha256=weights_hash)
            except PCBMError as exc:
                problems.append(f"model {model_id} v{number}: artifact: {exc}")
    for model_id, number in recorded:
        problems.append(f"audit events for model {model_id} v{number}, which does not exist")
    messages = [r[6] for r in versions]
    repeated = {m for m in messages if messages.count(m) > 1 and m}
    if repeated:
        problems.append(f"messages committed more than once: {sorted(repeated)[:5]}")
    if ledger is not None:
        present = {r[6]: (r[1], r[2]) for r in versions}
        for message, where in ledger.acknowledged.items():
            if present.get(message) != where:
                problems.append(f"acknowledged commit {message} {where} is {present.get(message)} after the crash")
    return problems


def check_served(url: str, token: str, workspace: Path, weights_of: set[int] | None = None) -> list[str]:
    """The restarted server serves each model's head version, with the head's weights (for the
    models in ``weights_of``; default: all)."""
    from app.services.artifacts import ArtifactStore

    problems = []
    store = ArtifactStore(workspace / "artifacts")
    headers = {"Authorization": f"Bearer {token}"}
    with sqlite3.connect(f"file:{workspace / 'pcbm.db'}?mode=ro", uri=True) as db:
        heads = dict(db.execute("SELECT m.id, v.artifact_key FROM models m JOIN model_versions v "
                                "ON v.id = m.head_version_id").fetchall())
        numbers = dict(db.execute("SELECT id, head_number FROM models").fetchall())
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for model_id, key in heads.items():
            summary = client.get(f"/api/v1/models/{model_id}")
            if summary.status_code != 200 or summary.json()["head_version"] != numbers[model_id]:
                problems.append(f"model {model_id}: head {summary.text[:80]}, expected version {numbers[model_id]}")
            if weights_of is not None and model_id not in weights_of:
                continue
            served = client.get(f"/api/v1/models/{model_id}/matrix")
            if served.status_code != 200 or served.json()["version"] != numbers[model_id]:
                problems.append(f"model {model_id}: serves {served.status_code} {served.text[:80]}, "
                                f"expected version {numbers[model_id]}")
                continue
            weight = store.get(key)[0]["weight"]
            if served.json()["weights"] != weight.tolist():
                problems.append(f"model {model_id}: the served weights are not the head's")
    return problems


# -- the loop ------------------------------------------------------------------------------------

def run_crash_loop(iterations: int = 20, *, restart: str = "fork", seed: int = 0, root: Path | None = None,
                   max_delay_s: float = 1.2, log=print) -> dict[str, Any]:
    from tests.reliability.harness import Server, build_tiny_workspace, prepare_workspace

    rng = random.Random(seed)
    root = Path(root or tempfile.mkdtemp(prefix="crash-loop-"))
    source = build_tiny_workspace(root / "source")
    users = {"admin": "admin", **{f"editor{i}": "researcher" for i in range(CLIENTS)}}
    prepared = prepare_workspace(source, root / "served" / "ws", users)
    server = ForkingServer(prepared.workspace) if restart == "fork" else Server(prepared.workspace)
    started = time.monotonic()
    ledger = Ledger()
    stats: dict[str, Any] = {"iterations": 0, "kills_with_commits_in_flight": 0, "restart_s": [], "violations": []}
    try:
        server.start()
        server.wait_ready()
        token = prepared.tokens["admin"]
        models = sorted(httpx.get(f"{server.url}/api/v1/models", headers=prepared.headers("admin"),
                                  timeout=60).json(), key=lambda m: m["id"])
        model_ids = [m["id"] for m in models]
        for i in range(iterations):
            stop = threading.Event()
            threads = [threading.Thread(target=client_loop, daemon=True, args=(
                server.url, prepared.tokens[f"editor{c}"], model_ids, ledger, stop, random.Random(rng.random()),
                f"i{i}c{c}")) for c in range(CLIENTS)]
            for thread in threads:
                thread.start()
            time.sleep(rng.uniform(0.05, max_delay_s))
            with ledger.lock:
                in_flight = ledger.in_flight
            server.kill()
            stop.set()
            stats["kills_with_commits_in_flight"] += in_flight > 0
            restart_started = time.monotonic()
            server.start()
            server.wait_ready()
            stats["restart_s"].append(time.monotonic() - restart_started)
            # A request sent in the instant after the kill waits in the listening socket's queue
            # and is served by the new server; the clients stop after that one.
            for thread in threads:
                thread.join(120)
            assert not any(t.is_alive() for t in threads), "a client is stuck"
            problems = check_database(prepared.workspace, ledger) + check_served(
                server.url, token, prepared.workspace, weights_of={model_ids[i % len(model_ids)]})
            stats["iterations"] += 1
            if problems:
                stats["violations"].append({"iteration": i, "problems": problems})
                log(f"iteration {i}: {problems}")
            elif log:
                log(f"iteration {i}: ok ({len(ledger.acknowledged)} acknowledged, {in_flight} in flight at the kill)")
    finally:
        server.close()
    with sqlite3.connect(f"file:{prepared.workspace / 'pcbm.db'}?mode=ro", uri=True) as db:
        present = {m for (m,) in db.execute("SELECT message FROM model_versions")}
    return {
        "iterations": stats["iterations"],
        "restart": restart,
        "seed": seed,
        "kills_with_commits_in_flight": stats["kills_with_commits_in_flight"],
        "acknowledged_commits": len(ledger.acknowledged),
        "acknowledged_lost": sum(1 for m in ledger.acknowledged if m not in present),
        "unacknowledged_in_flight_at_kill": len(ledger.unknown),
        "of_which_committed": len(ledger.unknown & present),
        "conflicts_409": ledger.conflicts,
        "other_refusals": ledger.refused,
        "versions_total": len(present),
        "restart_p50_s": round(statistics.median(stats["restart_s"]), 2) if stats["restart_s"] else None,
        "seconds_total": round(time.monotonic() - started, 1),
        "violations": stats["violations"],
    }


def run(quick: bool) -> dict[str, dict[str, Any]]:
    """For bench.run_all: 20 iterations in quick mode, 200 otherwise."""
    return {"crash_loop": run_crash_loop(20 if quick else 200, log=None)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--restart", choices=("fork", "exec"), default="fork")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zygote", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-save", action="store_true", help="do not merge the result into bench/results.json")
    args = parser.parse_args()
    if args.zygote is not None:
        zygote(args.zygote)
        return 0
    result = run_crash_loop(args.iterations, restart=args.restart, seed=args.seed)
    print(json.dumps(result, indent=2))
    if not args.no_save:
        from bench.run_all import write_results

        write_results({"crash_loop": {**result, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}})
    return 1 if result["violations"] or result["acknowledged_lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
