"""Run every benchmark and merge the results into bench/results.json.

``python -m bench.run_all [--quick]``. To add a benchmark, write a module with
``run(quick: bool) -> dict[section, metrics]`` and add its name to ``MODULES``; a module
that is not there (yet) is skipped with a note. Sections written by other benchmarks
are kept; the file is replaced atomically.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import markdown_table

MODULES = [
    "bench.bench_head",
    "bench.bench_cav",
    "bench.bench_edit_preview",
    "bench.app_preview",  # section "app_preview": POST /preview of one prune on the demo model, over loopback
    "bench.study_load",  # section "study_load": 30 participants on loopback, events sent vs stored
    "bench.load",  # section "load": 50 researchers browse, preview and commit on loopback (20 s quick, 180 s)
    "bench.throughput",  # section "throughput": embedding pipeline efficiency, micro-batched predict (~2.5 min quick)
]
RESULTS = Path(__file__).resolve().parent / "results.json"


def load_results(path: Path = RESULTS) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_results(sections: dict[str, Any], path: Path = RESULTS) -> None:
    """Merge ``sections`` into the results file, keeping everything else, atomically."""
    merged = {**load_results(path), **sections}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run_all(quick: bool, modules: list[str] = MODULES) -> tuple[dict[str, Any], list[str]]:
    sections: dict[str, Any] = {}
    notes: list[str] = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                notes.append(f"{name}: not present, skipped")
                continue
            raise
        start = time.perf_counter()
        try:
            result = module.run(quick)
        except Exception:  # noqa: BLE001 - one broken benchmark must not lose the others' results
            notes.append(f"{name}: failed\n{traceback.format_exc()}")
            continue
        for values in result.values():
            values.setdefault("seconds_total", round(time.perf_counter() - start, 2))
            values.setdefault("measured_at", time.strftime("%Y-%m-%d %H:%M:%S"))
        sections.update(result)
        write_results(result)  # keep what finished even if a later benchmark crashes
    return sections, notes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    args = parser.parse_args()
    sections, notes = run_all(args.quick)
    print(markdown_table(sections))
    for note in notes:
        print(f"\nnote: {note}", file=sys.stderr)
    return 1 if any("failed" in note for note in notes) else 0


if __name__ == "__main__":
    sys.exit(main())
