"""Path traversal: every user-given name or id stays inside its root.

Already covered elsewhere (not repeated): ``ml.store.safe_join`` on ``../``, ``..\\``,
encoded, double-encoded, absolute and symlinked forms (tests/ml/test_store.py); workspace
manifests pointing outside (tests/ml/test_workspace.py); the image id of the API's
``images/detail`` and ``images/file`` and of two image pages (tests/app).

Added here: *every* GET route of the app, API and pages, each of its string parameters
(query and path) in turn, gets each payload below; canary files sit just outside the
dataset root and the workspace (two levels up, and at an absolute path). No answer may be
a 5xx, carry a canary's bytes, or be an image for an ``id`` that points outside. Routes
are enumerated from the app, so a route added later is covered without an edit here.
On a real server (raw socket: no client normalises the path) ``/static`` and the model
pages get the same payloads in the path itself. Artifact keys from the database are
confined too.
"""

from __future__ import annotations

import re
import secrets
import socket
from pathlib import Path

import pytest
from fastapi.dependencies.utils import get_flat_params
from fastapi.routing import iter_route_contexts
from PIL import Image

from app.services.artifacts import ArtifactStore
from app.services.workspace_import import import_workspace
from ml.errors import DataError
from tests.app.workspace_helpers import copy_workspace

CANARY = "canary-" + secrets.token_hex(8)


def payloads(absolute: Path) -> list[str]:
    name = "canary.png"
    return [
        f"../{name}", f"../../{name}", f"..\\{name}", f"..\\..\\{name}", f"test/../../{name}",
        f"%2e%2e%2f{name}", f"%2e%2e/%2e%2e/{name}", f"%252e%252e%252f{name}", f"..%2f{name}", f"..%252f{name}",
        f"..%5c{name}", f"....//{name}", f"..;/{name}", str(absolute), f"file://{absolute}", f"//{absolute}",
        f"test/bird/x.png\x00../../{name}", f"test/bird/x.png%00../../{name}", "C:\\Windows\\win.ini",
    ]


FILE_NAMES = {"id", "path", "file", "name", "image", "next"}
# Values for the parameters a route needs besides the one under attack.
DEFAULTS = {"concept": "water", "concepts": "water", "score": "1", "class": "bird", "code": "x", "token": "x",
            "next": "/", "q": "", "id": "test/bird/img0150.png"}


def get_routes(app) -> list[tuple[str, list[str], list[str]]]:
    """(template, string path params, string query params) of every GET route."""
    found = []
    for route in iter_route_contexts(app.routes):
        if "GET" not in (getattr(route, "methods", None) or ()) or getattr(route, "dependant", None) is None:
            continue
        params = get_flat_params(route.dependant)
        path_names = {p.name for p in route.dependant.path_params}
        strings = [p for p in params if "str" in str(p.field_info.annotation)]
        found.append((route.path, [p.alias for p in strings if p.name in path_names],
                      [p.alias for p in strings if p.name not in path_names]))
    return found


@pytest.fixture
def world(tmp_path, db, ctx, make_user, token_headers, tiny_workspace):
    """A private copy of the tiny workspace with canary images around it, imported; a study
    participant when studies exist."""
    from app.models import Role

    root = tmp_path / "outer" / "inner"
    ws = copy_workspace(tiny_workspace, root / "ws")
    canary = Image.new("RGB", (7, 13), (1, 2, 3))
    canary.info["canary"] = CANARY
    for place in (ws, ws.parent, ws.parent.parent, ws / "data" / "test"):
        canary.save(place / "canary.png")
        (place / "canary.txt").write_text(CANARY)
    (ws / "data" / "test" / "canary.png").unlink()  # inside the dataset: a legitimate file must not exist
    (ws / "data" / "test" / "canary.txt").unlink()
    absolute = tmp_path / "abs-canary.png"
    canary.save(absolute)
    model_id = import_workspace(db, ctx, ws)[0]
    headers = {"staff": token_headers(make_user(Role.RESEARCHER, name="walker"))}
    try:
        from tests.app.study_helpers import ALL_TOOLS, join, open_study
    except ImportError:
        pass
    else:
        owner = make_user(Role.RESEARCHER, name="study-owner")
        study = open_study(db, owner, model_id, target_split="test", in_distribution_split="val",
                           conditions=[{"name": "all", "tools": ALL_TOOLS}])
        headers["participant"] = join(db, ctx, owner, study.id)[2]
    return model_id, headers, payloads(absolute)


def fill(template: str, model_id: int, attack: tuple[str, str] | None) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1)
        if attack and attack[0] == name:
            return attack[1]
        return str(model_id) if name in ("model_id", "model") else "1"

    return re.sub(r"\{([^}:]+)[^}]*\}", value, template)


def leaked(response) -> bool:
    if CANARY.encode() in response.content:
        return True
    if response.headers.get("content-type", "").startswith("image/"):
        from io import BytesIO

        try:
            image = Image.open(BytesIO(response.content))
            return image.size == (7, 13) or image.convert("RGB").getpixel((0, 0)) == (1, 2, 3)
        except Exception:  # noqa: BLE001 - not an image we can read: not the canary either
            return False
    return False


def test_every_string_parameter_of_every_get_route_stays_confined(client, world):
    model_id, headers, attacks = world
    problems, tried = [], 0
    for template, path_params, query_params in get_routes(client.app):
        who = "participant" if template.startswith(("/api/v1/studies/me", "/participate")) else "staff"
        if who not in headers:
            continue
        for name in path_params + query_params:
            # names that can name a file get every payload; the others (class, split, q, ...) a few
            for payload in attacks if name in FILE_NAMES or name in path_params else attacks[::6]:
                in_path = name in path_params
                if in_path and ("\x00" in payload or "/" in payload.replace("%2f", "")):
                    continue  # a raw "/" changes which route matches; the wire test below sends those
                url = fill(template, model_id, (name, payload) if in_path else None)
                params = {k: v for k, v in DEFAULTS.items() if k in query_params}
                if not in_path:
                    params[name] = payload
                response = client.get(url, params=params, headers=headers[who], follow_redirects=False)
                tried += 1
                if response.status_code >= 500 or leaked(response):
                    problems.append(f"{template} {name}={payload!r}: {response.status_code}")
                elif name == "id" and response.status_code == 200 and response.headers.get(
                        "content-type", "").startswith("image/"):
                    problems.append(f"{template} id={payload!r}: served an image")
    assert tried > 300 and problems == []


def raw_get(port: int, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


@pytest.mark.slow
def test_raw_traversal_in_the_path_on_a_real_server(live_server, served):
    secret = (served.workspace / "secret_key").read_bytes() if (served.workspace / "secret_key").exists() else None
    manifest = (served.workspace / "workspace.json").read_bytes()[:60]
    admin = served.headers("fuzz-admin")
    targets = ["/static/../app/settings.py", "/static/..%2f..%2fapp%2fsettings.py", "/static/%2e%2e/%2e%2e/pyproject.toml",
               "/static/%252e%252e/pyproject.toml", "/static/..\\..\\pyproject.toml", "/static//etc/passwd",
               "/models/../../workspace.json", "/models/%2e%2e%2f%2e%2e%2fworkspace.json/images/file?id=x",
               "/models/1/images/file?id=../../workspace.json", "/models/1/images/file?id=..%2f..%2fworkspace.json",
               "/api/v1/models/1/images/file?id=%252e%252e%252fworkspace.json",
               "/api/v1/models/1/images/file?id=/etc/passwd", "/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd"]
    for target in targets:
        status, body = raw_get(live_server.port, target, admin)
        assert 300 <= status < 500, (target, status, body[:200])
        assert manifest not in body and b"root:x:0:0" not in body and b"[project]" not in body
        assert b"class Settings" not in body and (secret is None or secret not in body)


def test_artifact_keys_from_the_database_are_confined(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    for key in ("../outside.safetensors", "..\\outside.safetensors", "%2e%2e%2foutside.safetensors",
                "%252e%252e%252foutside.safetensors", str(tmp_path / "outside.safetensors"), "ab/../../outside.safetensors"):
        with pytest.raises(DataError):
            store.get(key)
