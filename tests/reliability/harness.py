"""A real server on loopback for the reliability checks and the load/crash benchmarks.

:func:`prepare_workspace` makes a served workspace (the tiny open_clip workspace of
``tests/app/workspace_helpers.py``), migrates its SQLite database and creates users with
API tokens. :class:`Server` runs ``uvicorn --factory app.main:create_app`` on a listening
socket that this process owns (``--fd``), so a restarted server answers on the same port
and no other program can take it between restarts.

Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
SECRET = "reliability-secret-" + "s" * 32
REAL_FACTORY = "app.main:create_app"
SLOW_FACTORY = "tests.reliability.slow_app:create_app"


@dataclass
class Prepared:
    """A served workspace: its folder and a bearer token per user name."""

    workspace: Path
    tokens: dict[str, str] = field(default_factory=dict)
    user_ids: dict[str, int] = field(default_factory=dict)
    job_ids: list[int] = field(default_factory=list)

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}


def build_tiny_workspace(root: Path) -> Path:
    """The tiny workspace (random tiny CLIP, 198 images, a PCBM and a PCBM-h) under ``root``."""
    from tests.app.workspace_helpers import build_workspace, make_backbone

    backbone = make_backbone(root / "tiny-clip")
    return build_workspace(root / "ws", backbone)


def prepare_workspace(source: Path, target: Path, users: dict[str, str], jobs: int = 0) -> Prepared:
    """Copy the workspace ``source`` to ``target``, migrate its database, add ``users``.

    ``users`` maps names to roles; each user gets one API token (no password: the tests
    never log in with one). ``jobs`` queued jobs of an unknown kind are created for the
    first user, so that job routes have something to find.
    """
    from app.db import make_engine, make_session_factory
    from app.migrate import upgrade
    from app.models import User
    from app.services import jobs as job_service
    from app.services import users as user_service
    from tests.app.workspace_helpers import copy_workspace

    copy_workspace(source, target)
    for stale in ("pcbm.db", "pcbm.db-wal", "pcbm.db-shm", "secret_key"):
        (target / stale).unlink(missing_ok=True)
    engine = make_engine(f"sqlite:///{target / 'pcbm.db'}")
    upgrade(engine)
    prepared = Prepared(workspace=target)
    factory = make_session_factory(engine)
    with factory() as session:
        for name, role in users.items():
            user = user_service.create_user(session, name, role, None)
            _, plain = user_service.create_token(session, user, "reliability")
            prepared.tokens[name] = plain
            prepared.user_ids[name] = user.id
        owner = session.get(User, next(iter(prepared.user_ids.values()))) if users else None
        for _ in range(jobs):
            prepared.job_ids.append(job_service.create_job(session, "reliability-noop", user=owner).id)
    engine.dispose()
    return prepared


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


def server_env(workspace: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCBM_")}
    env.update({
        "PCBM_WORKSPACE": str(workspace),
        "PCBM_SECRET_KEY": SECRET,
        "PCBM_RUN_JOBS": "false",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    env.update(extra or {})
    return env


class Server:
    """``uvicorn --factory`` in a subprocess on a socket this process keeps open."""

    def __init__(self, workspace: Path, *, factory: str = REAL_FACTORY, env: dict[str, str] | None = None,
                 log_path: Path | None = None):
        self.workspace = Path(workspace)
        self.factory = factory
        self.env = server_env(self.workspace, env)
        self.log_path = log_path or self.workspace.parent / "server.log"
        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def command(self) -> list[str]:
        return [sys.executable, "-m", "uvicorn", "--factory", self.factory, "--fd", str(self.sock.fileno()),
                "--log-level", "warning", "--no-access-log"]

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the server process keeps it
        log.write(f"\n--- start {self.starts} ---\n".encode())
        log.flush()
        self.process = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        pass_fds=(self.sock.fileno(),), start_new_session=True)
        log.close()
        self.starts += 1

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 240.0, path: str = "/readyz") -> list[int]:
        """Poll ``path`` until it answers 200; returns every status seen on the way."""
        seen: list[int] = []
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    status = client.get(path).status_code
                except httpx.HTTPError:
                    status = 0
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == 200:
                    return seen
                time.sleep(0.05)
        raise TimeoutError(f"the server was not ready after {timeout:.0f} s (saw {seen}):\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind runs in the server."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def close(self) -> None:
        self.stop()
        self.sock.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def model_ids(url: str, headers: dict[str, str]) -> dict[str, int]:
    """``{name: id}`` of the server's models."""
    response = httpx.get(f"{url}/api/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return {m["name"]: m["id"] for m in response.json()}
