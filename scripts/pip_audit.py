"""Audit the pinned dependencies (pyproject.toml) for known vulnerabilities with pip-audit.

    python scripts/pip_audit.py            # the runtime and dev pins of pyproject.toml
    python scripts/pip_audit.py --json out.json

Every finding must be fixed (bump the pin) or waived in ``scripts/audit_waivers.toml``
with the advisory id, the package, why it does not apply to this project, and a date by
which to look again. Exit status:

- 0: no known vulnerability, or each one waived;
- 1: a vulnerability without a waiver, or a pinned package the service could not audit;
- 2: the audit could not run (pip-audit missing, bad waiver file);
- 3: skipped: no vulnerability database is reachable from here.

Before trusting a clean answer the script audits a canary pin with published advisories
(``requests==2.19.0``): when no service reports it, "no known vulnerabilities" would be a
lie (pip-audit then marks every package as skipped and still prints "No known
vulnerabilities found"). pip-audit's services are PyPI's per-release JSON and OSV. Where
neither answers but PyPI's per-project JSON does (it lists the advisories of a project's
*latest* release; canary: ``pycrypto``, whose last release has several), the script falls
back to it: pins that are the latest release are audited, the others are listed as "not
audited" (a warning, not a failure: nothing known is hidden, but nothing is proven either).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WAIVERS = Path(__file__).resolve().parent / "audit_waivers.toml"
CANARY = "requests==2.19.0"  # CVE-2018-18074 and others: any working database reports it
LATEST_CANARY = "pycrypto"  # abandoned; its last release (2.6.1) has PYSEC-2017-94 and others
SERVICES = ("pypi", "osv")
EXIT_OK, EXIT_VULNERABLE, EXIT_BROKEN, EXIT_SKIPPED = 0, 1, 2, 3


def pinned_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    pins = []
    for line in lines:
        requirement = line.split(";")[0].strip()
        if not re.match(r"^[A-Za-z0-9_.\-\[\]]+==[^=]+$", requirement):
            raise SystemExit(f"not pinned with ==: {line!r}")
        pins.append(requirement)
    return sorted(set(pins), key=str.lower)


def load_waivers(path: Path = WAIVERS) -> dict[str, dict]:
    """``{advisory id: waiver}``; every waiver names id, package, reason and review_by."""
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    waivers = {}
    for entry in data.get("waiver", []):
        missing = {"id", "package", "reason", "review_by"} - set(entry)
        if missing:
            raise ValueError(f"waiver {entry} lacks {sorted(missing)}")
        review_by = entry["review_by"]
        review_by = review_by if isinstance(review_by, date) else date.fromisoformat(str(review_by))
        if review_by < date.today():
            raise ValueError(f"waiver {entry['id']} ({entry['package']}) expired on {review_by}: review it")
        waivers[entry["id"]] = entry
    return waivers


def pip_audit(requirements: list[str], service: str, timeout_s: int = 240) -> dict:
    executable = shutil.which("pip-audit", path=str(Path(sys.executable).parent)) or shutil.which("pip-audit")
    if executable is None:
        raise FileNotFoundError("pip-audit is not installed (it is in the dev extras: pip install -e '.[dev]')")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(requirements) + "\n")
    try:
        result = subprocess.run(
            [executable, "-r", handle.name, "--no-deps", "--disable-pip", "-f", "json", "-s", service,
             "--progress-spinner", "off", "--aliases", "on", "--timeout", "30"],
            capture_output=True, text=True, timeout=timeout_s)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {"dependencies": [], "error": last}


def project_json(name: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=30) as response:  # noqa: S310
        return json.load(response)


def latest_release_audit(requirements: list[str]) -> dict:
    """pip-audit's JSON shape, from PyPI's per-project JSON (advisories of the latest release only)."""
    dependencies = []
    for requirement in requirements:
        name, version = requirement.split("==")
        name = name.split("[")[0]
        try:
            data = project_json(name)
        except OSError as exc:
            dependencies.append({"name": name, "version": version, "skip_reason": f"PyPI JSON unreachable: {exc}"})
            continue
        latest = data["info"]["version"]
        if latest != version:
            dependencies.append({"name": name, "version": version, "skip_reason":
                                 f"pinned {version}; PyPI's project JSON reports on the latest release ({latest}) only"})
            continue
        vulns = [{"id": v["id"], "aliases": v.get("aliases", []), "fix_versions": v.get("fixed_in", [])}
                 for v in data.get("vulnerabilities", [])]
        dependencies.append({"name": name, "version": version, "vulns": vulns})
    return {"dependencies": dependencies}


def working_service() -> tuple[str | None, list[str]]:
    """The first service that reports the canaries' advisories, and why the others did not."""
    reasons = []
    for service in SERVICES:
        report = pip_audit([CANARY], service, timeout_s=120)
        found = [d for d in report.get("dependencies", []) if d.get("vulns")]
        if found:
            return service, reasons
        skipped = [d.get("skip_reason") for d in report.get("dependencies", []) if d.get("skip_reason")]
        reasons.append(f"{service}: " + (report.get("error") or "; ".join(skipped) or f"no advisory for {CANARY}"))
    try:
        if project_json(LATEST_CANARY).get("vulnerabilities"):
            return "pypi-latest", reasons
        reasons.append(f"pypi-latest: PyPI lists no advisory for {LATEST_CANARY}")
    except OSError as exc:
        reasons.append(f"pypi-latest: {exc}")
    return None, reasons


def audit(requirements: list[str], waivers: dict[str, dict]) -> dict:
    service, reasons = working_service()
    if service is None:
        return {"status": "skipped", "reasons": reasons, "audited": 0, "findings": [], "unaudited": []}
    report = latest_release_audit(requirements) if service == "pypi-latest" else pip_audit(requirements, service)
    findings, unaudited = [], []
    for dependency in report.get("dependencies", []):
        if dependency.get("skip_reason"):
            unaudited.append(f"{dependency['name']}: {dependency['skip_reason']}")
        for vuln in dependency.get("vulns", []):
            ids = [vuln["id"], *vuln.get("aliases", [])]
            waiver = next((waivers[i] for i in ids if i in waivers), None)
            findings.append({"package": dependency["name"], "version": dependency.get("version"), "id": vuln["id"],
                             "aliases": vuln.get("aliases", []), "fix_versions": vuln.get("fix_versions", []),
                             "waived": waiver["reason"] if waiver else None})
    partial = service == "pypi-latest"  # there, a pin that is not the latest release cannot be audited
    status = "vulnerable" if (unaudited and not partial) or any(f["waived"] is None for f in findings) else "ok"
    return {"status": status, "service": service, "audited": len(requirements), "findings": findings,
            "unaudited": unaudited, "reasons": reasons}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    try:
        requirements = pinned_requirements()
        waivers = load_waivers()
        result = audit(requirements, waivers)
    except (FileNotFoundError, ValueError, subprocess.TimeoutExpired) as exc:
        print(f"pip-audit: cannot run: {exc}")
        return EXIT_BROKEN
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if result["status"] == "skipped":
        print("pip-audit: SKIPPED: no vulnerability database is reachable from this machine, so an audit "
              "would report nothing and prove nothing.")
        for reason in result["reasons"]:
            print(f"  {reason}")
        return EXIT_SKIPPED
    for finding in result["findings"]:
        state = f"waived: {finding['waived']}" if finding["waived"] else "NOT WAIVED"
        print(f"  {finding['package']} {finding['version']}: {finding['id']} {finding['aliases']} "
              f"fixed in {finding['fix_versions'] or 'no release yet'} -- {state}")
    for line in result["unaudited"]:
        print(f"  not audited: {line}")
    for reason in result["reasons"]:
        print(f"  (service unavailable: {reason[:200]})")
    print(f"pip-audit ({result['service']}): {result['audited']} pinned packages, {len(result['findings'])} "
          f"finding(s), {sum(1 for f in result['findings'] if f['waived'] is None)} not waived, "
          f"{len(result['unaudited'])} not audited")
    return EXIT_OK if result["status"] == "ok" else EXIT_VULNERABLE


if __name__ == "__main__":
    sys.exit(main())
