"""Supply chain: pip-audit of the pinned dependencies, with a waiver for each accepted finding.

``scripts/pip_audit.py`` does the work (``make audit``); see its docstring for how it
tells "no known vulnerabilities" from "no vulnerability database reachable". Here:
the pins and the waiver file are well formed (always), and the audit itself runs (it
needs PyPI; skipped, with the reason shown, when no vulnerability database answers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import pip_audit  # noqa: E402  (scripts/ is not a package)


def test_every_dependency_is_pinned_and_the_waivers_are_well_formed():
    pins = pip_audit.pinned_requirements()
    assert len(pins) >= 20 and all("==" in p for p in pins)
    assert any(p.startswith("pip-audit==") for p in pins), "the auditor itself is pinned in the dev extras"
    waivers = pip_audit.load_waivers()  # raises on a waiver without id, package, reason or review date
    assert all(w["reason"].strip() for w in waivers.values())


def test_an_expired_or_incomplete_waiver_is_refused(tmp_path):
    path = tmp_path / "waivers.toml"
    path.write_text('[[waiver]]\nid = "GHSA-1"\npackage = "x"\nreason = "r"\nreview_by = 2001-01-01\n')
    with pytest.raises(ValueError, match="expired"):
        pip_audit.load_waivers(path)
    path.write_text('[[waiver]]\nid = "GHSA-1"\npackage = "x"\n')
    with pytest.raises(ValueError, match="lacks"):
        pip_audit.load_waivers(path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pip_audit_reports_no_unwaived_vulnerability(tmp_path):
    report = tmp_path / "audit.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "pip_audit.py"), "--json", str(report)],
                            capture_output=True, text=True, timeout=540)
    if result.returncode == pip_audit.EXIT_SKIPPED:
        pytest.skip("pip-audit could not reach a vulnerability database: " + " | ".join(
            json.loads(report.read_text())["reasons"]))
    assert result.returncode == pip_audit.EXIT_OK, result.stdout + result.stderr
    data = json.loads(report.read_text())
    if data["unaudited"]:
        warnings.warn("pip-audit could not audit: " + "; ".join(data["unaudited"]), stacklevel=1)
    assert [f for f in data["findings"] if not f["waived"]] == []
