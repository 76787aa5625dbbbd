"""Who is at the console: login with the users' argon2 passwords, the signed session
cookie, the CSRF token every POST carries, and who may open which page.

The cookie is signed (itsdangerous, through Starlette's SessionMiddleware) with a secret
kept in the spool (``console.key``, mode 0600, refused when others can read it), so a
restart keeps people logged in and a copied cookie cannot be forged.  It holds the user's
name and the CSRF token, never a password.
"""
from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request

from gateway.config import WebConfig, read_secret

SECRET_FILE = "console.key"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"  # what htmx sends (hx-headers on <body>)


def cookie_secret(spool_dir: Path) -> str:
    """The key that signs session cookies: made once, kept at 0600 beside the queue."""
    path = Path(spool_dir) / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_secret(path, SECRET_FILE)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return read_secret(path, SECRET_FILE)


@dataclass(frozen=True)
class Visitor:
    """The logged-in user and what the console lets them do."""
    name: str
    admin: bool
    may_connect: bool


def visitor(request: Request, web: WebConfig) -> Visitor | None:
    name = request.session.get("user")
    if not name:
        return None
    admin = name in web.admins
    return Visitor(name, admin, admin or web.users_may_connect)


def csrf_token(request: Request) -> str:
    """The session's CSRF token, made on first use (also before login: the login form carries one)."""
    token = request.session.get(CSRF_FIELD)
    if not token:
        token = request.session[CSRF_FIELD] = secrets.token_urlsafe(32)
    return token


async def checked_form(request: Request):
    """The POSTed form, once its CSRF token matches the session's; 403 otherwise."""
    form = await request.form()
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    expected = request.session.get(CSRF_FIELD) or ""
    if not expected or not hmac.compare_digest(str(sent), expected):
        raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page and try again")
    return form


def log_in(request: Request, name: str) -> None:
    # A new CSRF token at login: a token seen before login is worth nothing after it.
    request.session.clear()
    request.session["user"] = name
    request.session[CSRF_FIELD] = secrets.token_urlsafe(32)


def log_out(request: Request) -> None:
    request.session.clear()
