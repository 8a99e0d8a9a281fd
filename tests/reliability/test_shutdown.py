"""Health and shutdown of a real server process (uvicorn on loopback).

tests/app/test_health.py checks ``/readyz`` in process (503 until the models are loaded,
with a failed load, on an unmigrated database). Here: the same on a real process as it
starts (the ``slow_server`` fixture's model loader waits 3 s), and what only a process can
show: SIGTERM lets in-flight requests finish and the process exits 0 (on ``pcbm serve``,
the production entry point, with no injected delay). Overload: test_overload.py.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .harness import ROOT, prepare_workspace, server_env

pytestmark = pytest.mark.slow


def test_readyz_is_503_until_the_models_are_loaded_while_healthz_is_200(slow_server):
    samples = slow_server.startup
    assert samples and samples[-1][1] == 200, slow_server.server.log_tail()
    waiting = [r for h, s, r in samples if s == 503]
    assert waiting, "readyz was never seen not ready (the loader waits 3 s)"
    assert all(h == 200 for h, _, _ in samples)
    error = waiting[0].json()["error"]
    assert error["detail"]["checks"] == {"database": True, "migrations": True, "models": False}
    assert waiting[0].headers["Retry-After"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pcbm() -> list[str]:
    script = Path(sys.executable).parent / "pcbm"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from app.cli import main; main()"]


def _open_request(port: int, head: bytes, first_part: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head + first_part)
    return sock


def _finish(sock: socket.socket, rest: bytes) -> tuple[int, bytes]:
    sock.sendall(rest)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    sock.close()
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[-1]


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return 1 << 30


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(tiny_workspace, tmp_path):
    """The production entry point (``pcbm serve``), no injected delay: two requests are in flight
    because their bodies are still arriving when SIGTERM comes (an upload to explain and an edit
    to commit). Both complete after the signal, the edit is durable, and the exit status is 0."""
    from PIL import Image

    prepared = prepare_workspace(tiny_workspace, tmp_path / "ws", {"researcher": "researcher"})
    port = _free_port()
    env = server_env(prepared.workspace)
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen([*_pcbm(), "serve", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        auth = prepared.headers("researcher")["Authorization"]
        model = httpx.get(f"http://127.0.0.1:{port}/api/v1/models", headers={"Authorization": auth}, timeout=30).json()[0]

        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
        upload = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
                  b"Content-Type: image/png\r\n\r\n" + buffer.getvalue() + b"\r\n--b--\r\n")
        commit = json.dumps({"base_version": model["head_version"], "message": "in flight at SIGTERM",
                             "edits": [{"op": "prune", "concept": "grass"}]}).encode()
        heads = {
            "predict": (f"POST /api/v1/models/{model['id']}/predict HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(upload)}\r\n\r\n"),
            "commit": (f"POST /api/v1/models/{model['id']}/edits HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(commit)}\r\n\r\n"),
        }
        bodies = {"predict": upload, "commit": commit}
        open_ = {name: _open_request(port, head.encode(), bodies[name][:40]) for name, head in heads.items()}
        time.sleep(0.5)  # the server has parsed both heads and waits for the rest of the bodies
        process.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # shutting down: it must wait for these two
        assert process.poll() is None, "the server quit with requests in flight"
        answers = {name: _finish(sock, bodies[name][40:]) for name, sock in open_.items()}
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert answers["predict"][0] == 200, answers["predict"]
    assert answers["commit"][0] == 201, answers["commit"]
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    number = json.loads(answers["commit"][1])["number"]
    with sqlite3.connect(prepared.workspace / "pcbm.db") as db:
        (message,) = db.execute("SELECT message FROM model_versions WHERE model_id = ? AND number = ?",
                                (model["id"], number)).fetchone()
    assert message == "in flight at SIGTERM"
