"""CSRF: every cookie-authenticated state change needs the session's CSRF token.

The routes are enumerated from the app, so a POST/PUT/PATCH/DELETE route added later
without the check fails here. Each is called with a signed-in browser session (the
cookie) and no token, then with a forged one: the answer must be 403 naming CSRF, before
any body is looked at. The few routes that work without a session have their own guard,
listed in ``OWN_GUARD`` with the reason; each guard is checked too.
"""

from __future__ import annotations

import re

from fastapi.routing import iter_route_contexts

from app.models import Role

STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}
PASSWORD = "correct horse battery staple"
OWN_GUARD = {
    # No session exists yet. JSON only: a cross-site page can only send a "simple" form
    # body (urlencoded, multipart, text/plain) without a CORS preflight, which is never granted.
    ("POST", "/api/v1/auth/login"): "json-only",
    ("POST", "/api/v1/studies/join"): "json-only",
    # HTML sign-in and study-join forms: a double-submit token in a short-lived cookie.
    ("POST", "/login"): "double-submit",
    ("POST", "/join"): "double-submit",
}


def state_changing_routes(app) -> list[tuple[str, str]]:
    routes = set()
    for route in iter_route_contexts(app.routes):
        for method in getattr(route, "methods", None) or ():
            if method in STATE_CHANGING:
                routes.add((method, route.path))
    return sorted(routes)


def concrete(template: str) -> str:
    """A URL for the template: every path parameter becomes 1 (the check runs before lookups)."""
    return re.sub(r"\{[^}]+\}", "1", template)


def test_every_state_change_with_a_session_cookie_needs_the_csrf_token(client, make_user):
    make_user(Role.ADMIN, name="csrf-admin", password=PASSWORD)
    login = client.post("/api/v1/auth/login", json={"name": "csrf-admin", "password": PASSWORD})
    assert login.status_code == 200 and client.cookies
    routes = state_changing_routes(client.app)
    assert len(routes) >= 20, routes  # the enumeration found the app's routes
    unguarded = []
    for method, template in routes:
        if (method, template) in OWN_GUARD:
            continue
        for headers in ({}, {"X-CSRF-Token": "forged"}):
            response = client.request(method, concrete(template), headers=headers, follow_redirects=False)
            if response.status_code != 403 or "CSRF" not in response.text:
                unguarded.append(f"{method} {template} {headers or ''}: {response.status_code} {response.text[:100]}")
    assert unguarded == []
    assert client.get("/api/v1/users/me").status_code == 200, "the session must have been valid throughout"


def test_the_routes_without_a_session_have_their_own_guard(client, make_user):
    make_user(Role.ADMIN, name="csrf-admin", password=PASSWORD)
    present = state_changing_routes(client.app)
    assert ("POST", "/login") in present and ("POST", "/api/v1/auth/login") in present
    for (method, path), guard in OWN_GUARD.items():
        if (method, path) not in present:
            continue  # a route of a part this build does not have
        if guard == "json-only":
            # what a cross-site form can send: refused before anything happens
            for body in ({"data": {"name": "csrf-admin", "password": PASSWORD, "code": "x"}},
                         {"content": b'{"name": "csrf-admin", "password": "x"}', "headers": {"content-type": "text/plain"}}):
                response = client.request(method, path, follow_redirects=False, **body)
                assert response.status_code in (400, 415, 422), f"{method} {path}: {response.status_code}"
                assert "set-cookie" not in response.headers
        else:
            # the form without the double-submit cookie's value: 403 and no session
            response = client.request(method, path, data={"username": "csrf-admin", "password": PASSWORD,
                                                          "code": "x", "consent": "yes", "csrf_token": "forged"},
                                      follow_redirects=False)
            assert response.status_code == 403, f"{method} {path}: {response.status_code}"
            assert "pcbm_session" not in response.headers.get("set-cookie", "")
