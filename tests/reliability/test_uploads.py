"""Hostile uploads on every route that takes a file, and body size limits on a real server.

Already covered in tests/app (not repeated here): plain text, SVG, a truncated PNG, a PNG
pixel bomb and an empty file on ``POST /api/v1/models/{id}/predict``; declared, chunked
and chunked-form bodies over the limit (test_errors.py). Added here:

- every upload route (the JSON predict and maps endpoints, the HTML upload page) gets
  polyglots (a valid GIF or PNG that is also an HTML page), formats outside the
  allow-list, pixel bombs of other formats, a compressed-text bomb and truncated files,
  and answers 4xx without a byte of them;
- the declared content type is never trusted (HTML labelled ``image/png`` is refused, a
  PNG labelled ``text/html`` is judged by its bytes), and a non-multipart request is 422;
- an accepted upload is neither stored anywhere under the workspace nor sent back;
- on uvicorn over loopback: an over-limit ``Content-Length`` is refused before a byte of
  the body is sent, chunked uploads are counted, and a lying ``Content-Length`` (smaller
  than the body) neither gets the extra bytes read as the upload nor harms the server.
"""

from __future__ import annotations

import functools
import io
import secrets
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, PngImagePlugin

from app.services.inspect import _MARKUP
from app.services.workspace_import import import_workspace
from tests.app.conftest import make_settings

HTML = b"<html><body><script>alert('MARKER')</script></body></html>"
LIMIT = 2_000_000  # PCBM_MAX_UPLOAD_BYTES of the live server (see conftest)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def noisy(size: int, seed: int = 0) -> Image.Image:
    pixels = torch.randint(0, 256, (size * size * 3,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return Image.frombytes("RGB", (size, size), pixels.numpy().tobytes())


@functools.cache
def hostile_files() -> dict[str, tuple[bytes, str, tuple[int, ...]]]:
    """name -> (bytes, declared content type, acceptable statuses)."""
    gif = encoded(Image.new("P", (8, 8), 1), "GIF")
    png = encoded(Image.new("RGB", (8, 8), (9, 9, 9)), "PNG")
    jpeg = encoded(noisy(64), "JPEG")
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", HTML.decode())
    bmp = bytearray(encoded(Image.new("RGB", (4, 4)), "BMP"))
    bmp[18:26] = struct.pack("<ii", 100_000, 100_000)
    text_bomb = png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"\x00" * (64 << 20), 9))
    return {
        # valid images that are also HTML pages
        "gif_then_html": (gif + HTML, "image/gif", (415,)),
        "gif_comment_html": (encoded(Image.new("P", (8, 8), 1), "GIF", comment=HTML), "image/gif", (415,)),
        "png_text_html": (encoded(Image.new("RGB", (8, 8)), "PNG", pnginfo=text), "image/png", (415,)),
        "gif_header_polyglot": (b"GIF89a/*\x0a\x00\x00\x00\x00*/=1;" + HTML, "image/gif", (415,)),
        "html_labelled_png": (HTML, "image/png", (415,)),
        # formats outside the allow-list
        "tiff": (encoded(Image.new("RGB", (8, 8)), "TIFF"), "image/tiff", (415,)),
        "ico": (encoded(Image.new("RGB", (16, 16)), "ICO"), "image/x-icon", (415,)),
        "postscript": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "application/postscript",
                       (415,)),
        # bombs: huge declared pixels, or a tiny chunk that inflates to 64 MiB
        "gif_pixel_bomb": (b"GIF89a" + struct.pack("<HH", 65535, 65535) + gif[10:], "image/gif", (413,)),
        "bmp_pixel_bomb": (bytes(bmp), "image/bmp", (413,)),
        "png_text_bomb": (png[:33] + text_bomb + png[33:], "image/png", (400,)),
        # truncated
        "jpeg_truncated": (jpeg[: len(jpeg) // 2], "image/jpeg", (400,)),
        "gif_truncated": (gif[: len(gif) // 2], "image/gif", (400, 415)),
    }




@pytest.fixture
def served_ids(db, ctx, tiny_workspace):
    return import_workspace(db, ctx, tiny_workspace)


@pytest.fixture
def researcher(as_role):
    return as_role("researcher")


def upload_routes(model_id: int) -> dict[str, tuple[str, dict]]:
    return {
        "api-predict": (f"/api/v1/models/{model_id}/predict", {}),
        "api-maps": (f"/api/v1/models/{model_id}/maps", {"params": {"concepts": "water"}}),
        "page-upload": (f"/models/{model_id}/images/upload", {"follow_redirects": False}),
    }


def test_hostile_files_are_4xx_on_every_upload_route_and_never_echoed(client, served_ids, researcher):
    wrong = []
    for name, (content, content_type, statuses) in hostile_files().items():
        for route, (url, kwargs) in upload_routes(served_ids[0]).items():
            response = client.post(url, files={"image": (f"{name}.bin", content, content_type)}, headers=researcher,
                                   **kwargs)
            if response.status_code not in statuses:
                wrong.append(f"{name} on {route}: {response.status_code} {response.text[:150]}")
            # the page's own scripts aside, nothing of the payload; no stretch of the upload comes back
            if b"MARKER" in response.content or content[6:40] in response.content:
                wrong.append(f"{name} on {route}: the upload is echoed")
            if route.startswith("api") and not response.json()["error"]["message"]:
                wrong.append(f"{name} on {route}: no error message")
    assert wrong == []
    assert len(hostile_files()) == 13


def test_the_declared_content_type_is_not_trusted(client, served_ids, researcher):
    png = encoded(Image.new("RGB", (20, 20), (200, 30, 30)), "PNG")
    url = f"/api/v1/models/{served_ids[0]}/predict"
    labelled_html = client.post(url, files={"image": ("x.html", png, "text/html")}, headers=researcher)
    assert labelled_html.status_code == 200 and labelled_html.headers["content-type"] == "application/json"
    as_json = client.post(url, content=png, headers={**researcher, "content-type": "application/json"})
    assert as_json.status_code in (400, 422)
    as_raw_image = client.post(url, content=png, headers={**researcher, "content-type": "image/png"})
    assert as_raw_image.status_code == 422
    wrong_field = client.post(url, files={"file": ("x.png", png, "image/png")}, headers=researcher)
    assert wrong_field.status_code == 422
    text_field = client.post(url, data={"image": "not a file"}, headers=researcher)
    assert text_field.status_code == 422


def test_accepted_uploads_are_neither_stored_nor_sent_back(client, served_ids, researcher, settings, tiny_workspace):
    token = f"UPLOAD-{secrets.token_hex(12)}"
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", token)
    content = encoded(noisy(48, seed=3), "PNG", pnginfo=info)
    for route, (url, kwargs) in upload_routes(served_ids[0]).items():
        response = client.post(url, files={"image": ("x.png", content, "image/png")}, headers=researcher, **kwargs)
        assert response.status_code == 200, f"{route}: {response.status_code} {response.text[:300]}"
        assert token.encode() not in response.content and content[40:200] not in response.content
    png_maps = client.post(f"/api/v1/models/{served_ids[0]}/maps", params={"concepts": "water", "format": "png"},
                           files={"image": ("x.png", content, "image/png")}, headers=researcher)
    assert png_maps.status_code == 200 and token.encode() not in png_maps.content
    stored = [path for root in (Path(settings.workspace), Path(tiny_workspace)) for path in root.rglob("*")
              if path.is_file() and token.encode() in path.read_bytes()]
    assert stored == []


def test_the_markup_screen_passes_ordinary_photos():
    """No false alarms on real compressed pixels (a polyglot check that refuses photos is useless)."""
    flagged = []
    for seed in range(40):
        image = noisy(160, seed)
        for fmt, options in (("JPEG", {"quality": 90}), ("PNG", {}), ("WEBP", {}), ("GIF", {})):
            data = encoded(image if fmt != "GIF" else image.convert("P"), fmt, **options)
            if _MARKUP.search(data):
                flagged.append((seed, fmt))
    assert flagged == []


def test_a_lying_content_length_cannot_hide_an_oversized_body(workspace):
    """ASGI level: the limit counts the bytes that arrive, whatever the header declared."""
    import asyncio

    from app.main import create_app

    app = create_app(make_settings(workspace, max_upload_bytes=1024))
    chunks = [b'{"name": "x", "password": "' + b"a" * 600, b"a" * 600, b'"}']
    sent: list[dict] = []

    async def receive():
        body = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": body, "more_body": bool(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/v1/auth/login", "raw_path": b"/api/v1/auth/login", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"10"), (b"host", b"testserver")],
             "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {}}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413


# -- on a real server: what the HTTP layer sees ------------------------------------------------------

def raw_exchange(port: int, request: bytes, body_chunks: list[bytes] = (), timeout: float = 20.0) -> bytes:
    """Send ``request`` (and the chunks, as long as the server reads) and return everything it answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: that is the point
        if body_chunks:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:  # ENOTCONN: the server already closed the connection (same as above)
                pass
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            received += data
        return received


def statuses(raw: bytes) -> list[int]:
    return [int(line.split()[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


def multipart(content: bytes, boundary: str = "reliabilityboundary") -> tuple[bytes, bytes, bytes]:
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    return head, content, f"\r\n--{boundary}--\r\n".encode()


def request_head(path: str, headers: dict[str, str], port: int) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *[f"{k}: {v}" for k, v in headers.items()], "", ""]
    return "\r\n".join(lines).encode()


@pytest.mark.slow
class TestOnTheWire:
    def paths(self, live_server, served):
        import httpx

        ids = httpx.get(f"{live_server.url}/api/v1/models", headers=served.headers("fuzz-admin"), timeout=30).json()
        model = ids[0]["id"]
        return [f"/api/v1/models/{model}/predict", f"/api/v1/models/{model}/maps?concepts=water",
                f"/models/{model}/images/upload"]

    def test_an_over_limit_content_length_is_refused_before_the_body(self, live_server, served):
        for path in self.paths(live_server, served):
            head = request_head(path, {**served.headers("fuzz-admin"), "Content-Length": str(LIMIT * 50),
                                       "Content-Type": "multipart/form-data; boundary=x"}, live_server.port)
            started = time.monotonic()
            answer = raw_exchange(live_server.port, head, timeout=10)  # no body is ever sent
            assert statuses(answer)[:1] == [413], (path, answer[:300])
            assert time.monotonic() - started < 5

    def test_chunked_uploads_are_counted(self, live_server, served):
        head_part, _, tail = multipart(b"")
        for path in self.paths(live_server, served):
            head = request_head(path, {**served.headers("fuzz-admin"), "Transfer-Encoding": "chunked",
                                       "Content-Type": "multipart/form-data; boundary=reliabilityboundary"},
                                live_server.port)
            pieces = [head_part] + [b"\x00" * 65536] * (LIMIT // 65536 + 8) + [tail]
            chunks = [f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces] + [b"0\r\n\r\n"]
            answer = raw_exchange(live_server.port, head, chunks)
            assert statuses(answer)[:1] == [413], (path, answer[:300])

    def test_a_lying_content_length_does_not_smuggle_bytes(self, live_server, served):
        """The header says 300 bytes; 3 MB follow. The server reads 300 (a truncated upload: 4xx) and
        treats the rest as garbage on the connection (400 or a close), never as a second request
        it would serve or as part of the upload."""
        head_part, _, _ = multipart(b"")
        smuggled = (f"GET /api/v1/users/me HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: {served.headers('fuzz-admin')['Authorization']}\r\n\r\n").encode()
        for path in self.paths(live_server, served):
            head = request_head(path, {**served.headers("fuzz-admin"), "Content-Length": "300",
                                       "Content-Type": "multipart/form-data; boundary=reliabilityboundary"},
                                live_server.port)
            body = [head_part + b"\x89PNG" + b"\x00" * (300 - len(head_part) - 4)]
            answer = raw_exchange(live_server.port, head, body + [b"\x00" * 65536] * 48 + [smuggled])
            seen = statuses(answer)
            assert seen and all(400 <= s < 500 for s in seen), (path, seen, answer[:300])
        import httpx

        assert httpx.get(f"{live_server.url}/healthz", timeout=10).status_code == 200
