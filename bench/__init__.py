"""Benchmarks: each module has ``run(quick: bool) -> dict`` returning result sections.

``python -m bench.<module> [--quick]`` runs one benchmark and prints JSON and a markdown
table; ``python -m bench.run_all [--quick]`` runs them all and merges the sections into
``bench/results.json``. Timings are wall-clock medians over repeats, with torch limited
to one intra-op thread (scikit-learn's solvers are single-threaded too), so ratios
compare like with like even on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds taken by ``fn()`` and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, Python {platform.python_version()}"


def markdown_table(sections: dict[str, dict[str, Any]]) -> str:
    """One row per (section, metric), scalars only; nested values are shown as JSON."""
    rows = ["| benchmark | metric | value |", "|---|---|---|"]
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, float):
                shown = f"{value:.4g}"
            elif isinstance(value, dict | list):
                shown = json.dumps(value)
            else:
                shown = str(value)
            rows.append(f"| {section} | {key} | {shown} |")
    return "\n".join(rows)


def main(run: Callable[[bool], dict[str, dict[str, Any]]]) -> None:
    """Command line for a single benchmark module."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    args = parser.parse_args()
    sections = run(args.quick)
    print(json.dumps(sections, indent=2, sort_keys=True))
    print()
    print(markdown_table(sections))
