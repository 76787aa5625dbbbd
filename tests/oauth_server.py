"""A small OAuth2 authorization server on 127.0.0.1 for the tests: the provider side of
Microsoft 365 or Gmail, speaking the same RFC 6749 / 8628 / 7662 / 7636 as they do.

    POST /token        grant_type refresh_token | authorization_code (PKCE S256) | device_code
    POST /devicecode   RFC 8628 device authorization (interval 1 s)
    GET  /authorize    approves at once and redirects back with a code (the test is the user)
    POST /introspect   RFC 7662, asked by Dovecot's oauth2 passdb and the test smarthost
    POST /approve      the user entering a device code (user_code=...)

Every token it issues is long and distinctive and goes into tests.harness.PASSWORDS, so
tests/torture/test_zz_secrets.py fails if one shows up in a log.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from tests.harness import PASSWORDS

CLIENT_ID = "dialmail-test-client"


@dataclass
class Grant:
    user: str
    access_expires: dict[str, float] = field(default_factory=dict)  # access token -> expiry (epoch)
    revoked: bool = False


class OAuthServer:
    def __init__(self, access_lifetime: float = 3600.0):
        self.access_lifetime = access_lifetime
        # Microsoft's way: each refresh answers with a new refresh token; here the old one
        # then stops working, the strictest form, so a client that keeps it fails at once.
        self.rotate = False
        self.grants: dict[str, Grant] = {}  # refresh token -> grant
        self.codes: dict[str, tuple[str, str, str]] = {}  # code -> (user, challenge, redirect_uri)
        self.devices: dict[str, dict] = {}  # device code -> {"user_code", "user" (once approved)}
        self.requests: list[tuple[str, str]] = []  # (path, grant_type or "") in order
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _form(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return dict(urllib.parse.parse_qsl(self.rfile.read(n).decode()))

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                form = self._form()
                path = urllib.parse.urlsplit(self.path).path
                with server.lock:
                    server.requests.append((path, form.get("grant_type", "")))
                    status, body = server.answer(path, form)
                self._json(status, body)

            def do_GET(self):  # noqa: N802
                parts = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(parts.query))
                with server.lock:
                    server.requests.append((parts.path, ""))
                    if parts.path != "/authorize" or q.get("client_id") != CLIENT_ID:
                        self.send_error(400)
                        return
                    if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256":
                        self.send_error(400)
                        return
                    code = _token("code")
                    server.codes[code] = ("office", q["code_challenge"], q["redirect_uri"])
                back = q["redirect_uri"] + "?" + urllib.parse.urlencode({"code": code, "state": q.get("state", "")})
                self.send_response(302)
                self.send_header("Location", back)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self) -> OAuthServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------ the test's levers

    def issue(self, user: str = "office") -> tuple[str, str]:
        """A refresh token and an access token for ``user``, as a finished login would give."""
        with self.lock:
            refresh = _token("refresh")
            self.grants[refresh] = Grant(user)
            return refresh, self._access(refresh)

    def revoke(self, refresh: str) -> None:
        with self.lock:
            self.grants[refresh].revoked = True

    def expire_access_tokens(self) -> None:
        with self.lock:
            for grant in self.grants.values():
                for token in grant.access_expires:
                    grant.access_expires[token] = 0.0

    def count(self, path: str, grant_type: str = "") -> int:
        with self.lock:
            return sum(1 for p, g in self.requests if p == path and (not grant_type or g == grant_type))

    def approve(self, user_code: str, user: str = "office") -> None:
        with self.lock:
            for device in self.devices.values():
                if device["user_code"] == user_code:
                    device["user"] = user
                    return
        raise KeyError(user_code)

    # ------------------------------------------------------------ the protocol

    def _access(self, refresh: str) -> str:
        token = _token("access")
        self.grants[refresh].access_expires[token] = time.time() + self.access_lifetime
        return token

    def _tokens(self, refresh: str) -> dict:
        return {"token_type": "Bearer", "access_token": self._access(refresh), "refresh_token": refresh,
                "expires_in": int(self.access_lifetime), "scope": "mail"}

    def answer(self, path: str, form: dict) -> tuple[int, dict]:
        if path == "/introspect":
            for grant in self.grants.values():
                expiry = grant.access_expires.get(form.get("token", ""))
                if expiry is not None and not grant.revoked and expiry > time.time():
                    return 200, {"active": True, "username": grant.user}
            return 200, {"active": False}
        if path == "/devicecode":
            if form.get("client_id") != CLIENT_ID:
                return 400, {"error": "invalid_client"}
            device = _token("device")
            user_code = secrets.token_hex(4).upper()
            self.devices[device] = {"user_code": user_code, "user": None}
            return 200, {"device_code": device, "user_code": user_code, "interval": 1, "expires_in": 60,
                         "verification_uri": f"{self.url}/device"}
        if path == "/approve":
            for device in self.devices.values():
                if device["user_code"] == form.get("user_code"):
                    device["user"] = form.get("user", "office")
                    return 200, {}
            return 404, {"error": "no such code"}
        if path != "/token":
            return 404, {"error": "not_found"}
        if form.get("client_id") != CLIENT_ID:
            return 401, {"error": "invalid_client", "error_description": "unknown client"}
        grant_type = form.get("grant_type")
        if grant_type == "refresh_token":
            grant = self.grants.get(form.get("refresh_token", ""))
            if grant is None or grant.revoked:
                return 400, {"error": "invalid_grant", "error_description": "AADSTS70008: the refresh token "
                                                                            "has expired or was revoked"}
            if self.rotate:
                grant.revoked = True
                refresh = _token("refresh")
                self.grants[refresh] = Grant(grant.user)
                return 200, self._tokens(refresh)
            return 200, self._tokens(form["refresh_token"])
        if grant_type == "authorization_code":
            found = self.codes.pop(form.get("code", ""), None)
            if found is None:
                return 400, {"error": "invalid_grant"}
            user, challenge, redirect_uri = found
            digest = base64.urlsafe_b64encode(hashlib.sha256(form.get("code_verifier", "").encode()).digest())
            if digest.rstrip(b"=").decode() != challenge or form.get("redirect_uri") != redirect_uri:
                return 400, {"error": "invalid_grant", "error_description": "PKCE or redirect_uri mismatch"}
            refresh = _token("refresh")
            self.grants[refresh] = Grant(user)
            return 200, self._tokens(refresh)
        if grant_type == "urn:ietf:params:oauth:grant-type:device_code":
            device = self.devices.get(form.get("device_code", ""))
            if device is None:
                return 400, {"error": "expired_token"}
            if device["user"] is None:
                return 400, {"error": "authorization_pending"}
            del self.devices[form["device_code"]]
            refresh = _token("refresh")
            self.grants[refresh] = Grant(device["user"])
            return 200, self._tokens(refresh)
        return 400, {"error": "unsupported_grant_type"}


def _token(kind: str) -> str:
    token = f"{kind}-SECRET-{secrets.token_urlsafe(24)}"
    PASSWORDS.add(token)
    return token
