"""Schema fuzzing of the REST API with schemathesis, against the real app on loopback.

The app (``app.main:create_app``) runs under uvicorn in a subprocess, serving a copy of
the tiny workspace; schemathesis reads its ``/openapi.json`` and runs every phase:
explicit examples, coverage (boundary and schema-violating values), fuzzing, and
stateful sequences along links it infers between operations (``model_id`` from
``GET /models``, version numbers from commits, token ids, ...). Dictionaries of real
model ids, image ids, classes and concepts reach past the "unknown id" answers.

Checks: every check schemathesis has (no 5xx, documented status codes, content types,
headers and response schemas, schema-violating input rejected, auth not ignored, 405
with a correct ``Allow``, ...) except ``positive_data_acceptance``: a schema-valid
request can still name a class, concept or image that this model does not have, and
the API rightly answers 422 or 404 (the schema cannot list a model's class names).

Bounded for CI (``FUZZ_MAX_EXAMPLES`` cases per operation and phase, ~2 minutes on 2
cores); ``make fuzz-long`` sets ``FUZZ_MAX_TIME`` and keeps fuzzing that long.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import httpx
import pytest

from .harness import ROOT, Prepared, Server, model_ids

FUZZ_MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "5"))
FUZZ_WORKERS = int(os.environ.get("FUZZ_WORKERS", "2"))
FUZZ_MAX_TIME = int(os.environ.get("FUZZ_MAX_TIME", "0"))  # seconds; 0: bounded by examples only
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261128"))
FUZZ_SAVE = os.environ.get("FUZZ_SAVE") == "1"  # merge the summary into bench/results.json (make fuzz-long)
CHECKS_OFF = {
    "positive_data_acceptance": "a schema-valid request may name a class/concept/image the model lacks: 404/422",
}
# Operations that answer 401 to any bearer token by design, so schemathesis's "only 401
# seen" warning is expected for them and for nothing else. (Participant-only operations
# answer the fuzzing admin 403; those are covered by the route matrix instead.)
AUTH_ONLY_401 = {"GET /api/v1/auth/session"}  # browser sessions only: it hands out the CSRF token
API = "/api/v1"


def _toml(value) -> str:
    return json.dumps(value)  # JSON strings, numbers and arrays are valid TOML values


def literal_siblings(paths: list[str]) -> list[str]:
    """Paths like ``/users/me`` that share their parent with a templated ``/users/{user_id}``."""
    templated = {p.rsplit("/", 1)[0] for p in paths if p.rsplit("/", 1)[-1].startswith("{")}
    return sorted(p for p in paths if not p.rsplit("/", 1)[-1].startswith("{") and p.rsplit("/", 1)[0] in templated)


def write_config(path: Path, prepared: Prepared, models: dict[str, int], image_ids: list[str],
                 classes: list[str], concepts: list[str], paths: list[str]) -> Path:
    """The run's ``schemathesis.toml``: seed, limits, dictionaries of real ids, one exemption."""
    lines = [
        f"seed = {FUZZ_SEED}",
        'hooks = "tests.reliability.st_hooks"',
        f"workers = {FUZZ_WORKERS}",
        "request-timeout = 60",
        "[generation]",
        f"max-examples = {FUZZ_MAX_EXAMPLES}",
        'database = "none"',
        "[checks]",  # every check is on by default; these are off, with the reason above
        *[f"{name}.enabled = false" for name in CHECKS_OFF],
        "[phases.coverage.extra-data-sources]",
        "responses = true",
        "[phases.fuzzing.extra-data-sources]",
        "responses = true",
        "[dictionaries.models]",
        f"values = {_toml(sorted(models.values()))}",
        "[dictionaries.images]",
        f"values = {_toml(image_ids)}",
        "[dictionaries.classes]",
        f"values = {_toml(classes)}",
        "[dictionaries.concepts]",
        f"values = {_toml(concepts)}",
        "[dictionaries.jobs]",
        f"values = {_toml(prepared.job_ids or [1])}",
        "[parameters]",
        '"path.model_id" = { dictionary = "models", probability = 0.8 }',
        '"query.id" = { dictionary = "images", probability = 0.6 }',
        '"query.class" = { dictionary = "classes", probability = 0.5 }',
        '"body.id" = { dictionary = "images", probability = 0.6 }',
        '"body.concept" = { dictionary = "concepts", probability = 0.6 }',
        '"body.edits[*].concept" = { dictionary = "concepts", probability = 0.6 }',
        '"body.edits[*].class_name" = { dictionary = "classes", probability = 0.5 }',
        '"path.job_id" = { dictionary = "jobs", probability = 0.7 }',
    ]
    shadowed = literal_siblings(paths)
    if shadowed:
        # PATCH /users/me reaches PATCH /users/{user_id} and fails its integer check with 422
        # (and a 405 there names PATCH in Allow) where the schema, which knows only GET
        # /users/me, expects 405: a documented wart of such path pairs, not a hole.
        lines += ["[[operations]]", f"include-path = {_toml(shadowed)}", "checks.unsupported_method.enabled = false",
                  "checks.allow_header_conformance.enabled = false"]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_schemathesis(server: Server, prepared: Prepared, out: Path) -> tuple[int, str, Path]:
    """Run the schemathesis CLI against ``server``; returns (exit code, output, JUnit report)."""
    from ml.embed import EmbeddedDataset
    from tests.app.workspace_helpers import CLASSES, CONCEPTS

    admin = prepared.headers("fuzz-admin")
    models = model_ids(server.url, admin)
    data = EmbeddedDataset.load(prepared.workspace / "embeddings" / "toy.safetensors")
    paths = list(httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"])
    config = write_config(out / "schemathesis.toml", prepared, models, data.image_ids[::12], CLASSES, CONCEPTS,
                          paths)
    junit = out / "junit.xml"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
        f"{server.url}/openapi.json", "--header", f"Authorization: {admin['Authorization']}",
        "--report", "junit", "--report-junit-path", str(junit),
        "--include-path-regex", f"^({re.escape(API)}/|/healthz|/readyz)",
    ]
    if FUZZ_MAX_TIME:
        command += ["--max-time", str(FUZZ_MAX_TIME)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FUZZ_PROTECTED_IDS": json.dumps({
        "user_id": [prepared.user_ids["fuzz-admin"]], "token_id": _token_ids(server, admin)})}
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True,
                            timeout=(FUZZ_MAX_TIME or 600) + 300)
    return result.returncode, result.stdout + result.stderr, junit


def _token_ids(server: Server, headers: dict[str, str]) -> list[int]:
    return [t["id"] for t in httpx.get(f"{server.url}{API}/tokens", headers=headers, timeout=30).json()]


def summarize(output: str, junit: Path) -> dict:
    """Numbers for docs/reliability.md: cases generated, operations, links, failures, time."""
    def number(pattern: str) -> int | None:
        found = re.search(pattern, output)
        return int(found.group(1)) if found else None

    tree = ElementTree.parse(junit) if junit.is_file() else None
    suite = tree.getroot() if tree is not None else None
    seconds = re.search(r"in ([\d.]+)s =+\s*$", output.strip())
    return {
        "operations_tested": number(r"Tested:\s+(\d+)"),
        "cases_generated": number(r"(\d+) generated"),
        "links_covered": number(r"API Links:\s+(\d+) covered"),
        "links_total": number(r"API Links:\s+\d+ covered / \d+ selected / (\d+) total"),
        "junit_failures": None if suite is None else sum(int(s.get("failures", 0)) + int(s.get("errors", 0))
                                                         for s in suite.iter("testsuite")),
        "seconds": float(seconds.group(1)) if seconds else None,
        "max_examples": FUZZ_MAX_EXAMPLES,
        "workers": FUZZ_WORKERS,
        "max_time_s": FUZZ_MAX_TIME or None,
        "seed": FUZZ_SEED,
    }


def only_401(output: str) -> set[str]:
    """Operations schemathesis saw answer nothing but 401 (in its "Authentication failed" warning)."""
    section = re.search(r"401 Unauthorized \(\d+ operations?\):\n((?:\s+- .*\n)+)", output)
    return {line.strip()[2:] for line in section.group(1).splitlines()} if section else set()


@pytest.mark.slow
@pytest.mark.timeout(FUZZ_MAX_TIME + 900)
def test_schemathesis_finds_no_server_error_and_no_schema_violation(live_server, served, tmp_path):
    code, output, junit = run_schemathesis(live_server, served, tmp_path)
    summary = summarize(output, junit)
    print(json.dumps(summary))
    if FUZZ_SAVE:
        import time

        from bench.run_all import write_results

        write_results({"fuzz": {**summary, "exit_code": code, "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}})
    tail = output[-12_000:]
    assert only_401(output) <= AUTH_ONLY_401, "the fuzzing user was locked out:\n" + tail
    me = httpx.get(f"{live_server.url}{API}/users/me", headers=served.headers("fuzz-admin"), timeout=30)
    assert me.status_code == 200 and me.json()["role"] == "admin", "the fuzzing admin lost its access"
    assert code == 0, f"schemathesis failed (exit {code}):\n{tail}\n--- server log ---\n{live_server.log_tail()}"
    assert summary["cases_generated"] and summary["cases_generated"] > 200, tail
    assert summary["links_covered"], "the stateful phase followed no link:\n" + tail
    assert live_server.process.poll() is None, "the server died during fuzzing"


# -- the schema itself: what the fuzzer validates against must say everything ----------------------

ERROR_STATUSES = {"400", "401", "403", "404", "422"}


def test_every_api_operation_declares_its_bodies_and_errors(client):
    schema = client.get("/openapi.json").json()
    problems = []
    for path, operations in schema["paths"].items():
        if not path.startswith(API):
            continue
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            responses = operation["responses"]
            ok = [code for code in responses if code.startswith("2")]
            if not ok:
                problems.append(f"{where}: no success response")
            for code in ok:
                content = responses[code].get("content", {})
                if not any(media.get("schema") for media in content.values()) and code != "204":
                    if "image/png" not in content:
                        problems.append(f"{where}: {code} has no response schema")
            missing = ERROR_STATUSES - set(responses)
            if missing:
                problems.append(f"{where}: error statuses not declared: {sorted(missing)}")
            for code, response in responses.items():
                if code[0] in "45":
                    ref = json.dumps(response.get("content", {}))
                    if "ErrorBody" not in ref:
                        problems.append(f"{where}: {code} is not the ErrorBody shape")
            body = operation.get("requestBody")
            if body is not None and not any(m.get("schema") for m in body.get("content", {}).values()):
                problems.append(f"{where}: request body without a schema")
    assert problems == []


def test_405_names_every_method_of_the_path(client):
    response = client.request("OPTIONS", f"{API}/tokens")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


def test_ids_past_64_bits_are_4xx_on_every_route(client, as_role):
    """The fuzzer's first find: an id the database cannot hold crashed the request (500)."""
    from fastapi.routing import iter_route_contexts

    admin, huge, wrong, checked = as_role("admin"), str(10**30), [], 0
    for route in iter_route_contexts(client.app.routes):
        dependant = getattr(route, "dependant", None)
        ints = [p.name for p in (dependant.path_params if dependant else []) if p.field_info.annotation is int]
        for method in (getattr(route, "methods", None) or ()) if ints else ():
            url = re.sub(r"\{([^}:]+)[^}]*\}", lambda m: huge if m.group(1) in ints else "1", route.path)
            response = client.request(method, url, headers=admin, follow_redirects=False)
            checked += 1
            if response.status_code >= 500:
                wrong.append(f"{method} {route.path}: {response.status_code}")
    assert checked >= 15 and wrong == []
