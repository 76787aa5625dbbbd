"""The web console in tests: a Site whose daemon serves ``[web]``, and a cookie-keeping
HTTP client that reads the CSRF token from the page like a browser's form would."""
from __future__ import annotations

import http.cookiejar
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from tests.harness import PASSWORDS
from tests.peers import free_port, wait_port

ADMIN, ADMIN_PW = "alice", "alice-pw"  # the site fixture's users; alice is made an admin
USER, USER_PW = "bob", "bob-pw"


def web_section(port: int, admins=(ADMIN,), extra: str = "") -> str:
    names = ", ".join(f'"{a}"' for a in admins)
    return f'\n[web]\nlisten = ["127.0.0.1:{port}"]\nadmins = [{names}]\n{extra}\n'


def start_console(site, extra: str = "", web_extra: str = "", smtp_extra: str = "", pop3_extra: str = "") -> str:
    """Start ``site``'s daemon with the console on a free port; its base URL."""
    port = free_port()
    site.write_config(extra + web_section(port, extra=web_extra))
    if smtp_extra:
        site.config_path.write_text(site.config_path.read_text().replace("[smtp]\n", f"[smtp]\n{smtp_extra}\n", 1))
    if pop3_extra:
        site.config_path.write_text(site.config_path.read_text().replace("[pop3]\n", f"[pop3]\n{pop3_extra}\n", 1))
    site.start()
    wait_port("127.0.0.1", port, proc=site.proc)
    return f"http://127.0.0.1:{port}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):
        return None


@dataclass
class Reply:
    status: int
    headers: dict
    text: str

    @property
    def location(self) -> str | None:
        return self.headers.get("location")


class Client:
    """One browser's worth of cookies; redirects are returned, not followed."""

    def __init__(self, base: str, tls=None):
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        handlers = [urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect]
        if tls is not None:  # an ssl.SSLContext that trusts the test's certificate
            handlers.append(urllib.request.HTTPSHandler(context=tls))
        self.opener = urllib.request.build_opener(*handlers)
        self.token: str | None = None

    def _open(self, req) -> Reply:
        try:
            r = self.opener.open(req, timeout=30)
        except urllib.error.HTTPError as exc:
            r = exc
        text = r.read().decode("utf-8", "replace")
        found = re.search(r'name="csrf" value="([^"]+)"', text)
        if found:
            self.token = found.group(1)
        return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, text)

    def get(self, path: str) -> Reply:
        return self._open(urllib.request.Request(self.base + path))

    def post(self, path: str, fields: dict | None = None, csrf: bool = True, headers: dict | None = None) -> Reply:
        data = dict(fields or {})
        # Every password typed into the console is looked for in the logs after the run
        # (tests/torture/test_zz_secrets.py).
        PASSWORDS.update(str(data[k]) for k in ("password", "old", "new") if data.get(k))
        if csrf:
            data["csrf"] = self.token
        return self._open(urllib.request.Request(self.base + path, urllib.parse.urlencode(data).encode(),
                                                 headers=headers or {}))

    def login(self, user: str, password: str) -> Reply:
        self.get("/login")
        r = self.post("/login", {"user": user, "password": password, "next": "/"})
        if r.status == 303:
            self.get("/")  # the login gave the session a new CSRF token: read it as a browser would
        return r
