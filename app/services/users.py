"""Users, API tokens, password login and one-time login links.

There are no default accounts: the first user is made with ``pcbm users create``.
"""

from __future__ import annotations

import re
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.db import utcnow, write_transaction
from app.errors import Conflict, InvalidInput, NotFound, RateLimited, Unauthorized
from app.models import ApiToken, LoginLink, Role, User
from app.security import (
    MIN_PASSWORD_LENGTH,
    LoginRateLimiter,
    hash_password,
    new_token,
    token_hash,
    verify_password,
)
from app.services import audit

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@\-]{0,63}$")
# A token's last_used_at is refreshed at most this often, so API reads do not all write.
TOKEN_TOUCH_INTERVAL = timedelta(minutes=1)
LOGIN_PATH = "/login/once"


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidInput(f"the password must be at least {MIN_PASSWORD_LENGTH} characters long")


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise InvalidInput(f"unknown role {role!r}; choose one of {choices}") from None


def create_user(
    session: Session, name: str, role: Role | str, password: str | None = None, *, actor: User | None = None
) -> User:
    """Create a user; without ``password`` the user logs in by token or one-time link only."""
    if not _NAME.match(name or ""):
        raise InvalidInput(f"invalid user name {name!r}: use 1-64 letters, digits, '_', '-', '.' or '@'")
    checked_role = _role(role)
    if password is not None:
        _check_password(password)
    password_hash = hash_password(password) if password is not None else None  # slow: outside the lock
    with write_transaction(session):
        if session.scalar(select(User.id).where(User.name == name)) is not None:
            raise Conflict(f"a user named {name!r} already exists")
        user = User(name=name, role=checked_role, password_hash=password_hash, is_active=True)
        session.add(user)
        session.flush()
        audit.record(session, "user.create", user=actor, object_type="user", object_id=user.id,
                     payload={"name": name, "role": checked_role.value})
    return user


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    return user


def get_user_by_name(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.id)))


def update_user(
    session: Session,
    user_id: int,
    *,
    actor: User | None,
    role: Role | str | None = None,
    password: str | None = None,
    is_active: bool | None = None,
) -> User:
    changes: dict[str, object] = {}
    logged: dict[str, object] = {}  # what the audit log may show (never a hash)
    if role is not None:
        changes["role"] = checked = _role(role)
        logged["role"] = checked.value
    if password is not None:
        _check_password(password)
        changes["password_hash"] = hash_password(password)
        logged["password"] = "changed"
    if is_active is not None:
        changes["is_active"] = logged["is_active"] = is_active
    with write_transaction(session):
        user = get_user(session, user_id)
        for field, value in changes.items():
            setattr(user, field, value)
        audit.record(session, "user.update", user=actor, object_type="user", object_id=user.id, payload=logged)
    return user


def authenticate(session: Session, name: str, password: str) -> User | None:
    """The active user with this name and password, else ``None`` (same time either way)."""
    user = session.scalar(select(User).where(User.name == name))
    ok = verify_password(password, user.password_hash if user is not None else None)
    if user is None or not ok or not user.is_active:
        return None
    return user


def login(session: Session, limiter: LoginRateLimiter, name: str, password: str, client_ip: str) -> User:
    """Check a password login, counting failures per user name and client IP."""
    wait = limiter.retry_after(name, client_ip)
    if wait:
        raise RateLimited(f"too many failed logins; try again in {wait} s", retry_after_s=wait)
    user = authenticate(session, name, password)
    if user is None:
        limiter.failure(name, client_ip)
        raise Unauthorized("wrong user name or password")
    limiter.success(name, client_ip)
    return user


def create_token(session: Session, user: User, name: str) -> tuple[ApiToken, str]:
    """A new API token for ``user``; the plain token is returned once and never stored."""
    name = (name or "").strip()
    if not name or len(name) > 64:
        raise InvalidInput("a token needs a name of 1-64 characters")
    plain = new_token()
    with write_transaction(session):
        token = ApiToken(user_id=user.id, name=name, token_hash=token_hash(plain), prefix=plain[:12])
        session.add(token)
        session.flush()
        audit.record(session, "token.create", user=user, object_type="api_token", object_id=token.id,
                     payload={"name": name})
    return token, plain


def list_tokens(session: Session, user: User) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id)))


def revoke_token(session: Session, user: User, token_id: int) -> ApiToken:
    with write_transaction(session):
        token = session.get(ApiToken, token_id)
        if token is None or token.user_id != user.id:  # another user's token is "not found", not "forbidden"
            raise NotFound(f"no token with id {token_id}")
        if token.revoked_at is None:
            token.revoked_at = utcnow()
            audit.record(session, "token.revoke", user=user, object_type="api_token", object_id=token.id)
    return token


def user_for_token(session: Session, plain: str) -> User | None:
    """The active user a bearer token belongs to, or ``None``."""
    token = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_hash(plain)))
    if token is None or token.revoked_at is not None:
        return None
    user = session.get(User, token.user_id)
    if user is None or not user.is_active:
        return None
    now = utcnow()
    if token.last_used_at is None or now - token.last_used_at > TOKEN_TOUCH_INTERVAL:
        with write_transaction(session):
            session.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
    return user


def create_login_link(session: Session, user: User, *, ttl_s: int = 900) -> str:
    """A single-use login path (``/login/once?token=...``) valid for ``ttl_s`` seconds."""
    plain = secrets.token_urlsafe(32)
    with write_transaction(session):
        session.add(LoginLink(user_id=user.id, token_hash=token_hash(plain),
                              expires_at=utcnow() + timedelta(seconds=ttl_s)))
        audit.record(session, "login_link.create", user=user, object_type="user", object_id=user.id,
                     payload={"ttl_s": ttl_s})
    return f"{LOGIN_PATH}?token={plain}"


def redeem_login_link(session: Session, plain: str) -> User:
    """The user of a valid, unused, unexpired link; the link is spent in the same transaction."""
    invalid = Unauthorized("this login link is invalid, expired or already used")
    if not plain or len(plain) > 128:
        raise invalid
    with write_transaction(session):
        now = utcnow()
        # Spend the link with a conditional UPDATE: of two concurrent uses exactly one matches.
        spent = session.execute(
            update(LoginLink)
            .where(LoginLink.token_hash == token_hash(plain), LoginLink.used_at.is_(None),
                   LoginLink.expires_at > now)
            .values(used_at=now)
            .returning(LoginLink.user_id)
        ).scalar_one_or_none()
        if spent is None:
            raise invalid
        user = session.get(User, spent)
        if user is None or not user.is_active:
            raise invalid
        audit.record(session, "login_link.use", user=user, object_type="user", object_id=user.id)
    return user
