"""Signing a TestClient in as a browser would, and reading what pages show."""

from __future__ import annotations

import re
from html import unescape

from fastapi.testclient import TestClient

from app.models import User
from app.services import users as user_service


def sign_in(client: TestClient, session, user: User) -> str:
    """Spend a one-time link for ``user`` (sets the session cookie); returns the session's CSRF token."""
    link = user_service.create_login_link(session, user)
    response = client.get(link, follow_redirects=False)
    assert response.status_code == 303, response.text
    return csrf_of(client)


def csrf_of(client: TestClient) -> str:
    response = client.get("/api/v1/auth/session")
    assert response.status_code == 200, response.text
    return response.json()["csrf_token"]


def text_of(html: str) -> str:
    """The visible text of a page, whitespace collapsed (tags and SVG markup dropped)."""
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", html)).split())


def hidden_value(html: str, name: str) -> str:
    """The value of the first hidden input called ``name``."""
    for tag in re.findall(r"<input\b[^>]*>", html):
        if f'name="{name}"' in tag:
            found = re.search(r'value="([^"]*)"', tag)
            return unescape(found.group(1)) if found else ""
    raise AssertionError(f"no input named {name!r}")
