"""The one-time interactive logins of ``dialmail oauth login``: what gives us a refresh token.

* Device code (RFC 8628): dialmail shows a short code and a web address; the admin enters
  the code on any machine with a browser and approves; dialmail polls the token endpoint
  meanwhile.  Microsoft offers it; Google refuses it for Gmail scopes.
* Loopback redirect (RFC 8252, with PKCE): dialmail listens on 127.0.0.1 (an unused port),
  sends the browser to the provider's sign-in page, and the provider redirects the browser
  back to that port with a one-time code, which dialmail trades for the tokens.  Google's
  "desktop app" clients work this way; it needs a browser on the machine running dialmail
  (or a forwarded port).

Both are plain OAuth2 against the endpoints in the account's ``oauth`` table (authlib's
client does the protocol), so they run the same against Microsoft, Google or any other
provider, and against the authorization server the tests start on 127.0.0.1.
"""
from __future__ import annotations

import html
import http.server
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from gateway.config.oauth import OAuthConfig
from gateway.mail.errors import OperationalError
from gateway.oauth.tokens import HTTP_TIMEOUT, client_session

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class LoginFailed(OperationalError):
    """The interactive login did not give a token; the message says why in the provider's words."""


@dataclass(frozen=True)
class DeviceCode:
    user_code: str
    verification_uri: str
    expires_in: int
    interval: int
    message: str | None  # Microsoft words the instruction itself


def device_flow(oauth: OAuthConfig, show: Callable[[DeviceCode], None], sleep=time.sleep,
                clock=time.monotonic) -> dict:
    """Run the device-code flow; returns the token endpoint's answer (with the refresh token)."""
    import requests
    from authlib.integrations.base_client.errors import OAuthError
    if not oauth.device_url:
        raise LoginFailed(f"{oauth.account}: the provider has no device flow configured (oauth.device_url); "
                          f"use the browser flow")
    try:
        reply = requests.post(oauth.device_url, data={"client_id": oauth.client_id,
                                                      "scope": " ".join(oauth.scopes)}, timeout=HTTP_TIMEOUT)
    except requests.RequestException as exc:
        raise LoginFailed(f"could not reach {oauth.device_url}: {type(exc).__name__}") from None
    body = _json(reply)
    if reply.status_code != 200 or "device_code" not in body:
        raise LoginFailed(f"the device endpoint refused: {_error_text(body, reply)}")
    code = DeviceCode(user_code=body["user_code"],
                      verification_uri=body.get("verification_uri") or body.get("verification_url", ""),
                      expires_in=int(body.get("expires_in", 900)), interval=int(body.get("interval", 5)),
                      message=body.get("message"))
    show(code)
    interval = max(1, code.interval)
    deadline = clock() + code.expires_in
    with client_session(oauth) as session:
        while clock() < deadline:
            sleep(interval)  # RFC 8628 3.5: the provider sets the polling pace
            try:
                return session.fetch_token(oauth.token_url, grant_type=DEVICE_GRANT,
                                           device_code=body["device_code"], timeout=HTTP_TIMEOUT)
            except OAuthError as exc:
                if exc.error == "authorization_pending":
                    continue
                if exc.error == "slow_down":
                    interval += 5
                    continue
                raise LoginFailed(_refusal(exc)) from None
            except requests.RequestException as exc:
                raise LoginFailed(f"could not reach {oauth.token_url}: {type(exc).__name__}") from None
    raise LoginFailed(f"nobody approved the code {code.user_code} within {code.expires_in}s; run the login again")


def browser_flow(oauth: OAuthConfig, show: Callable[[str], None], timeout: float = 300.0,
                 port: int = 0) -> dict:
    """Run the loopback-redirect flow; ``show`` gets the sign-in address to open in a browser."""
    import requests
    from authlib.common.security import generate_token
    from authlib.integrations.base_client.errors import OAuthError
    if not oauth.authorization_url:
        raise LoginFailed(f"{oauth.account}: the provider has no browser flow configured (oauth.authorization_url)")
    answer: dict[str, str] = {}
    arrived = threading.Event()

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
            if not ("code" in query or "error" in query):
                self.send_error(404)
                return
            answer.update(query)
            arrived.set()
            done = "error" not in query
            text = ("dialmail has the sign-in; you may close this window." if done else
                    f"The sign-in was refused: {html.escape(query.get('error_description') or query['error'])}")
            page = f"<!doctype html><title>dialmail</title><p>{text}</p>".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):  # the query holds the one-time code: never logged
            pass

    # Microsoft registers the loopback address as "http://localhost" (any port matches);
    # Google and RFC 8252 prefer the literal address.
    host = "localhost" if oauth.provider == "microsoft" else "127.0.0.1"
    server = http.server.HTTPServer(("127.0.0.1", port), Redirect)
    redirect_uri = f"http://{host}:{server.server_port}/"
    waiter = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    waiter.start()
    try:
        verifier = generate_token(64)
        extra = {"access_type": "offline", "prompt": "consent"} if oauth.provider == "google" else {}
        with client_session(oauth, redirect_uri=redirect_uri, code_challenge_method="S256") as session:
            url, state = session.create_authorization_url(oauth.authorization_url, code_verifier=verifier, **extra)
            show(url)
            if not arrived.wait(timeout):
                raise LoginFailed(f"no sign-in came back to {redirect_uri} within {int(timeout)}s; run the login again")
            if "error" in answer:
                raise LoginFailed(f"the provider refused the sign-in: {answer['error']}"
                                  + (f" ({answer['error_description']})" if answer.get("error_description") else ""))
            if answer.get("state") != state:
                raise LoginFailed("the sign-in came back with a wrong state: not from this login; run it again")
            try:
                return session.fetch_token(oauth.token_url, code=answer["code"], code_verifier=verifier,
                                           timeout=HTTP_TIMEOUT)
            except OAuthError as exc:
                raise LoginFailed(_refusal(exc)) from None
            except requests.RequestException as exc:
                raise LoginFailed(f"could not reach {oauth.token_url}: {type(exc).__name__}") from None
    finally:
        server.shutdown()
        server.server_close()


def _refusal(exc) -> str:
    meaning = {"access_denied": "the sign-in was declined",
               "expired_token": "the code expired before it was approved",
               "invalid_client": "the client_id (or secret) is not the app registration's",
               "invalid_grant": "the code was not accepted",
               "invalid_scope": "the provider does not grant these scopes to this app",
               "unauthorized_client": "the app registration does not allow this flow"}.get(exc.error)
    text = f"{exc.error}: {exc.description}" if exc.description else str(exc.error)
    return f"the provider refused: {text}" + (f" ({meaning})" if meaning else "")


def _json(reply) -> dict:
    try:
        body = reply.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_text(body: dict, reply) -> str:
    if "error" in body:
        return f"{body['error']}: {body.get('error_description', '')}".strip(": ")
    return f"HTTP {reply.status_code}"
