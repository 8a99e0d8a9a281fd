"""The deployment files say what docs/settings.md and the README promise.

No Docker here: these read the files. The server's SIGTERM handling itself is tested in
tests/reliability/test_shutdown.py; this checks that in the container SIGTERM reaches it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cmd() -> list[str]:
    lines = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1, "one CMD"
    return json.loads(lines[0][4:])


def test_the_container_migrates_first_and_then_the_server_is_pid_1():
    command = _cmd()[-1]
    upgrade, serve = command.index("pcbm db upgrade"), command.index("pcbm serve")
    assert upgrade < serve and "&&" in command[upgrade:serve]  # no server on an unmigrated database
    assert re.search(r"\bexec pcbm serve\b", command), "without exec, sh stays PID 1 and swallows SIGTERM"


def test_compose_starts_the_app_after_a_healthy_database_with_a_required_secret():
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "pg_isready" in compose and "condition: service_healthy" in compose
    assert "PCBM_SECRET_KEY: ${PCBM_SECRET_KEY:?" in compose  # refuses to start without one
    assert '"127.0.0.1:8000:8000"' in compose  # not published on every interface by default
