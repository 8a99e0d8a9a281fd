"""The edit preview as a user meets it: ``POST /api/v1/models/{id}/preview`` on the demo model.

A real server (uvicorn in a subprocess) serves the demo workspace on 127.0.0.1 with its own
database, and one client times previews of a single prune (each background concept, for its
paired class and for every class, in turn), then of pruning all background concepts at once.
The target (issue 4) is a median under 100 ms for a single prune on this machine.

    python -m bench.app_preview [--quick] [--workspace data/demo]

The demo is built first if needed (minutes the first time, seconds when cached).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

TARGET_MS = 100.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _token(db_url: str) -> str:
    from app.db import make_engine, make_session_factory
    from app.migrate import upgrade
    from app.services import users

    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with make_session_factory(engine)() as session:
            user = users.create_user(session, "bench", "researcher", None)
            _, plain = users.create_token(session, user, "bench")
            return plain
    finally:
        engine.dispose()


def _timed(client: httpx.Client, path: str, body: dict[str, Any]) -> float:
    start = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = (time.perf_counter() - start) * 1000
    response.raise_for_status()
    return elapsed


def run_app_preview(workspace: Path, repeats: int = 40) -> dict[str, Any]:
    from ml.demo.build import build_demo
    from ml.demo.world import default_config
    from tests.reliability.harness import Server, model_ids

    report = build_demo(workspace)
    world = json.loads((workspace / "world" / "world.json").read_text())
    config = default_config()
    pairing = config.pairing or {}
    backgrounds = list(world.get("backgrounds") or config.backgrounds)
    with tempfile.TemporaryDirectory(prefix="pcbm-bench-preview-") as tmp:
        db_url = f"sqlite:///{Path(tmp) / 'pcbm.db'}"
        token = _token(db_url)
        env = {"PCBM_DATABASE_URL": db_url, "PCBM_ARTIFACT_DIR": str(Path(tmp) / "artifacts"), "PCBM_DEVICE": "cpu"}
        with Server(workspace, env=env, log_path=Path(tmp) / "server.log") as server:
            server.start()
            server.wait_ready()
            headers = {"Authorization": f"Bearer {token}"}
            model_id = model_ids(server.url, headers)["pcbm"]
            with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
                version = client.get(f"/api/v1/models/{model_id}").json()["head_version"]
                names = {row["concept"] for row in client.get(f"/api/v1/models/{model_id}/concepts").json()["concepts"]}
                concepts = [c for c in names if any(b in c for b in backgrounds)]
                if not concepts:
                    raise RuntimeError(f"no background concepts among {sorted(names)}")
                path = f"/api/v1/models/{model_id}/preview"
                singles = []
                for concept in concepts:
                    paired = next((cls for cls, bg in pairing.items() if bg in concept), None)
                    singles.append({"op": "prune", "concept": concept})
                    if paired:
                        singles.append({"op": "prune", "concept": concept, "class_name": paired})
                for edit in singles[:3]:  # warm-up: caches, first-request costs
                    _timed(client, path, {"base_version": version, "edits": [edit]})
                single = [_timed(client, path, {"base_version": version, "edits": [singles[i % len(singles)]]})
                          for i in range(repeats)]
                every = [_timed(client, path, {"base_version": version,
                                               "edits": [{"op": "prune", "concept": c} for c in concepts]})
                         for _ in range(max(5, repeats // 4))]
    median = statistics.median(single)
    return {
        "ms_median_single_prune": round(median, 2),
        "ms_p95_single_prune": round(percentile(single, 0.95), 2),
        "ms_median_prune_all_background": round(statistics.median(every), 2),
        "target_ms": TARGET_MS,
        "meets_target": median < TARGET_MS,
        "requests": len(single) + len(every),
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "setup": (f"demo model 'pcbm' ({len(names)} concepts; previews on splits {sorted(report.get('pcbm', {}))}), "
                  f"uvicorn on 127.0.0.1, one client, {len(concepts)} background concepts"),
    }


def run(quick: bool) -> dict[str, dict[str, Any]]:
    root = Path("data/demo").resolve()
    return {"app_preview": run_app_preview(root, repeats=20 if quick else 60)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workspace", type=Path, default=Path("data/demo"))
    args = parser.parse_args()
    result = {"app_preview": run_app_preview(args.workspace.resolve(), repeats=20 if args.quick else 60)}
    print(json.dumps(result, indent=2))
    from bench.run_all import write_results

    write_results(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
