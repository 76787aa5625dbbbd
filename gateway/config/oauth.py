"""The ``oauth`` table of a ``[[fetch]]`` account or of ``[smarthost]``: who issues its tokens.

Microsoft 365 and Gmail take OAuth2 bearer tokens (SASL XOAUTH2 or OAUTHBEARER) instead of
passwords.  The table names the provider and the app registration (client id, tenant,
client secret); the endpoints and scopes of the two big providers are filled in here, so
an admin writes only what the registration gave them.  ``generic`` is any other RFC 6749
server, named by its endpoints.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gateway.config.model import read_secret
from gateway.config.sections import _Section

AUTH_METHODS = ("password", "xoauth2", "oauthbearer")
PROVIDERS = ("microsoft", "google", "generic")

_MS = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0"
# A refresh token needs offline_access at Microsoft; Gmail's one scope covers IMAP and SMTP.
_DEFAULT_SCOPES = {
    ("microsoft", "imap"): ("https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"),
    ("microsoft", "smtp"): ("https://outlook.office.com/SMTP.Send", "offline_access"),
    ("google", "imap"): ("https://mail.google.com/",),
    ("google", "smtp"): ("https://mail.google.com/",),
}


@dataclass(frozen=True)
class OAuthConfig:
    account: str  # the name `dialmail oauth` knows it by: the [[fetch]] name, or "smarthost"
    kind: str  # fetch | smarthost
    provider: str  # microsoft | google | generic
    client_id: str
    tenant: str | None
    client_secret_file: Path | None
    token_url: str
    authorization_url: str | None  # the browser (loopback redirect) flow
    device_url: str | None  # the device-code flow (RFC 8628)
    scopes: tuple[str, ...]

    def client_secret(self) -> str | None:
        if self.client_secret_file is None:
            return None
        return read_secret(self.client_secret_file, f"{self.account}: oauth.client_secret_file")

    @property
    def key(self) -> str:
        """The token's name in the spool: a fetch account may be called "smarthost" too."""
        return "smarthost" if self.kind == "smarthost" else f"fetch.{self.account}"


def parse(s: _Section, account: str, kind: str) -> OAuthConfig:
    """Read the ``oauth`` table ``s`` of ``account``; ``kind`` is "fetch" (IMAP) or "smarthost"."""
    use = "smtp" if kind == "smarthost" else "imap"
    provider = s.get("provider", str, required=True)
    if provider not in PROVIDERS:
        s.fail("provider", f"must be one of {', '.join(repr(p) for p in PROVIDERS)}, got {provider!r}")
    client_id = s.get("client_id", str, required=True)
    if not client_id.strip():
        s.fail("client_id", "must not be empty: the application (client) id of the app registration")
    tenant = s.get("tenant", str, None)
    secret = s.path("client_secret_file")
    token_url = s.get("token_url", str, None)
    authorization_url = s.get("authorization_url", str, None)
    device_url = s.get("device_url", str, None)
    if provider == "microsoft":
        tenant = tenant or "organizations"
        if not re.fullmatch(r"[A-Za-z0-9.-]+", tenant):
            s.fail("tenant", f"{tenant!r} is not a tenant: use the directory (tenant) id, a domain such as "
                             f"\"contoso.onmicrosoft.com\", or \"organizations\"")
        base = _MS.format(tenant=tenant)
        token_url = token_url or f"{base}/token"
        authorization_url = authorization_url or f"{base}/authorize"
        device_url = device_url or f"{base}/devicecode"
    elif provider == "google":
        if tenant is not None:
            s.fail("tenant", "only Microsoft has tenants")
        token_url = token_url or "https://oauth2.googleapis.com/token"
        authorization_url = authorization_url or "https://accounts.google.com/o/oauth2/v2/auth"
        # Google's device flow refuses the Gmail scope: only the browser flow gets a token.
        if device_url is not None:
            s.fail("device_url", "Google's device flow does not issue Gmail tokens; leave it out "
                                 "(`dialmail oauth login` opens a browser instead)")
        if secret is None:
            s.fail("client_secret_file", "a Google desktop client has a client secret: write it into a "
                                         "file (chmod 600) and name it here")
    else:
        if tenant is not None:
            s.fail("tenant", "only Microsoft has tenants")
        if not token_url:
            s.fail("token_url", "a generic provider needs its token endpoint, e.g. "
                                "\"https://login.example.net/oauth2/token\"")
    for key, url in (("token_url", token_url), ("authorization_url", authorization_url),
                     ("device_url", device_url)):
        if url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            s.fail(key, f"{url!r} is not an http(s) URL")
    scopes = s.str_list("scopes", _DEFAULT_SCOPES.get((provider, use), ()))
    if not scopes:
        s.fail("scopes", "a generic provider needs the scopes to ask for, e.g. scopes = [\"mail\"]")
    return OAuthConfig(account=account, kind=kind, provider=provider, client_id=client_id, tenant=tenant,
                       client_secret_file=secret, token_url=token_url, authorization_url=authorization_url,
                       device_url=device_url, scopes=tuple(scopes))
