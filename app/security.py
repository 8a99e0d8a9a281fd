"""Secrets handling: password hashes, random tokens, signed session cookies, login rate limit.

Nothing here touches the database or the web framework; services and dependencies
combine these pieces.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

# scrypt cost: 2**14 x 8 x 1 needs 16 MiB and ~50 ms, the interactive-login setting from the scrypt paper.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
_SCRYPT_MAXMEM = 64 * 1024 * 1024
MIN_PASSWORD_LENGTH = 8
TOKEN_PREFIX = "pcbm_"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str) -> str:
    """A self-describing scrypt hash: ``scrypt$n$r$p$salt$hash``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=_SCRYPT_MAXMEM, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check of ``password`` against a :func:`hash_password` string."""
    if not stored:
        # Spend the same time as a real check, so response times do not reveal which users exist.
        hashlib.scrypt(password.encode(), salt=b"\0" * 16, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                       maxmem=_SCRYPT_MAXMEM, dklen=32)
        return False
    try:
        scheme, n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                                maxmem=_SCRYPT_MAXMEM, dklen=32)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, _unb64(expected))


def new_token() -> str:
    """A random bearer token (256 bits), recognisable by its prefix in logs and secret scanners."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class BrowserSession:
    user_id: int
    csrf_token: str


class SessionSigner:
    """Signs and reads the browser session cookie (user id + CSRF token), with expiry."""

    def __init__(self, secret_key: str, max_age_s: int):
        self._serializer = URLSafeTimedSerializer(secret_key, salt="pcbm.session")
        self.max_age_s = max_age_s

    def issue(self, user_id: int) -> tuple[str, BrowserSession]:
        session = BrowserSession(user_id=user_id, csrf_token=secrets.token_urlsafe(32))
        cookie = self._serializer.dumps({"u": session.user_id, "c": session.csrf_token})
        return cookie, session

    def read(self, cookie: str | None) -> BrowserSession | None:
        if not cookie:
            return None
        try:
            data: Any = self._serializer.loads(cookie, max_age=self.max_age_s)
        except BadSignature:  # includes SignatureExpired
            return None
        if not isinstance(data, dict) or not isinstance(data.get("u"), int) or not isinstance(data.get("c"), str):
            return None
        return BrowserSession(user_id=data["u"], csrf_token=data["c"])


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())


class LoginRateLimiter:
    """Counts failed logins per (user name, client IP) in a sliding window.

    Kept in memory: one process serves logins (see ``run_jobs``); a restart forgets
    counts, which costs an attacker a restart per window at most.
    """

    def __init__(self, max_failures: int, window_s: float, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window_s = window_s
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(name: str, client_ip: str) -> tuple[str, str]:
        return (name.strip().lower()[:64], client_ip)

    def _prune(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times

    def retry_after(self, name: str, client_ip: str) -> int:
        """Seconds until another attempt is allowed; 0 when one is allowed now."""
        now = self._clock()
        with self._lock:
            times = self._prune(self._key(name, client_ip), now)
            if len(times) < self.max_failures:
                return 0
            return max(1, int(times[0] + self.window_s - now + 0.999))

    def failure(self, name: str, client_ip: str) -> None:
        now = self._clock()
        with self._lock:
            if len(self._failures) > 100_000:  # bound memory under a spraying attack
                for key in list(self._failures)[:50_000]:
                    self._prune(key, now)
            key = self._key(name, client_ip)
            times = self._prune(key, now)
            times.append(now)
            self._failures[key] = times

    def success(self, name: str, client_ip: str) -> None:
        with self._lock:
            self._failures.pop(self._key(name, client_ip), None)
