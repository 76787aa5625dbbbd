"""A working access token for an account, refreshed when it has (nearly) expired.

Refreshing is an HTTPS request to the provider's token endpoint, so it happens only while
the line is up: the fetch and the relay ask for a token right before they log in, inside
the session's online part.  Nothing else refreshes, so being offline is never a token
failure.  Three things can go wrong, each with its own meaning:

* the token endpoint does not answer (``TokenUnavailable``): the line, not the token; the
  stored token is left as it is and the account waits for the next session;
* the provider refuses the refresh token (``TokenRefused``: revoked, expired, the password
  changed, consent withdrawn): the account is marked refused and not tried again until
  `dialmail oauth login`; the postmaster gets one notice;
* nothing was ever stored (``NoToken``): `dialmail oauth login` was not run yet.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from gateway.config import Config
from gateway.config.oauth import OAuthConfig
from gateway.mail.errors import ConfigError, OperationalError
from spool.tokens import REFUSED, VALID, TokenRecord, TokenStore, TokenStoreError

log = logging.getLogger("dialmail.oauth")

HTTP_TIMEOUT = 30.0


class TokenProblem(OperationalError):
    """No usable token for an account; the message says what the admin can do."""


class NoToken(TokenProblem):
    pass


class TokenRefused(TokenProblem):
    pass


class TokenUnavailable(TokenProblem):
    pass


def read_key(path: Path | None) -> bytes | None:
    """The Fernet key of ``[server] token_key_file``, refused if others could read it."""
    if path is None:
        return None
    from gateway.config import read_secret
    key = read_secret(path, "server.token_key_file").strip().encode()
    from cryptography.fernet import Fernet
    try:
        Fernet(key)
    except ValueError:
        raise ConfigError(f"server.token_key_file: {path} does not hold a key (32 url-safe base64 bytes); "
                          f"make one with `dialmail oauth new-key {path}`") from None
    return key


def store_for(config: Config) -> TokenStore:
    return TokenStore(config.spool_dir, read_key(config.server.token_key_file))


def client_session(oauth: OAuthConfig, **kw):
    """An authlib client for the provider: public (no secret) unless a secret file is set."""
    from authlib.integrations.requests_client import OAuth2Session
    secret = oauth.client_secret()
    return OAuth2Session(oauth.client_id, secret, scope=" ".join(oauth.scopes),
                         token_endpoint_auth_method="client_secret_post" if secret else "none", **kw)


def record_from(token: dict, now: float, old: TokenRecord | None = None) -> TokenRecord:
    """What a token endpoint answered, as the record to store.  A provider that rotates
    refresh tokens sends a new one; one that does not keeps the old one valid."""
    expires_in = token.get("expires_in")
    refresh = token.get("refresh_token") or (old.refresh_token if old else None)
    return TokenRecord(refresh_token=refresh, access_token=token.get("access_token"),
                       expires_at=now + float(expires_in) if expires_in is not None else None,
                       stored_at=old.stored_at if old and not token.get("refresh_token") else now,
                       refreshed_at=now, state=VALID)


def access_token(config: Config, oauth: OAuthConfig, clock=time.time, force: bool = False) -> str:
    """An access token good for a login now; refreshes it first when it has (nearly) expired,
    or always with ``force`` (the server refused the one we had).  Blocking: call it from
    a worker thread, and only while the link is up."""
    name = oauth.account
    try:
        store = store_for(config)
        rec = store.load(oauth.key)
        oauth.client_secret()  # a secret file others can read is refused before it is sent anywhere
    except (TokenStoreError, ConfigError) as exc:
        raise TokenProblem(str(exc)) from None
    if rec is None or not (rec.refresh_token or rec.access_token):
        raise NoToken(f"no OAuth2 token stored for {name}: run `dialmail oauth login {name}`")
    if rec.state == REFUSED:
        raise TokenRefused(refused_text(name, rec.error))
    now = clock()
    if not force and rec.access_usable(now):
        return rec.access_token
    if not rec.refresh_token:
        raise NoToken(f"the access token of {name} has expired and there is no refresh token: "
                      f"run `dialmail oauth login {name}`")
    import requests
    from authlib.integrations.base_client.errors import OAuthError
    try:
        with client_session(oauth) as session:
            token = session.refresh_token(oauth.token_url, refresh_token=rec.refresh_token, timeout=HTTP_TIMEOUT)
    except OAuthError as exc:
        if exc.error in ("invalid_grant", "interaction_required", "consent_required"):
            rec.state, rec.error = REFUSED, f"{exc.error}: {exc.description or ''}".strip(": ")
            rec.access_token = None
            store.save(oauth.key, rec)
            log.error("oauth %s: the provider refused the refresh token (%s)", name, rec.error)
            raise TokenRefused(refused_text(name, rec.error)) from None
        # invalid_client and the like: the app registration, not the token
        raise TokenProblem(f"the token endpoint refused the app registration of {name} "
                           f"({exc.error}: {exc.description or 'no description'}): check oauth.client_id, "
                           f"oauth.tenant and oauth.client_secret_file") from None
    except (requests.RequestException, OSError) as exc:
        raise TokenUnavailable(f"could not reach the token endpoint of {name} ({type(exc).__name__}); "
                               f"the stored token is kept and tried again next session") from None
    if not token.get("access_token"):
        raise TokenUnavailable(f"the token endpoint of {name} answered without an access token")
    fresh = record_from(token, now, rec)
    store.save(oauth.key, fresh)
    log.info("oauth %s: access token refreshed, good until %s", name,
             time.strftime("%Y-%m-%d %H:%M", time.localtime(fresh.expires_at)) if fresh.expires_at else "unknown")
    return fresh.access_token


def refused_text(name: str, error: str | None) -> str:
    return (f"the provider refused the OAuth2 refresh token of {name} ({error or 'no reason given'}): it was "
            f"revoked, expired or the password changed; run `dialmail oauth login {name}` to store a new one")


def tell_postmaster_once(config: Config, queue, oauth: OAuthConfig, why: str) -> bool:
    """One notice to the postmaster per refused token (until a new one is stored)."""
    from gateway.office.directory import Directory
    from gateway.office.notice import notify_postmaster
    from spool.users import Users
    store = store_for(config)
    try:
        rec = store.load(oauth.key)
    except TokenStoreError:
        return False
    if rec is None or rec.state != REFUSED or rec.postmaster_told:
        return False
    text = (f"dialmail could not log in to {oauth.account} at the ISP:\n\n{why}\n\n"
            f"Until then no mail is {'sent' if oauth.kind == 'smarthost' else 'fetched'} for this account; "
            f"the other accounts carry on.\n")
    notify_postmaster(config, Directory(config, Users(config.spool_dir)), queue,
                      f"OAuth2 login of {oauth.account} refused: action needed", text)
    rec.postmaster_told = True
    store.save(oauth.key, rec)
    return True


def sign_ins_needed(config: Config) -> list[str]:
    """One line per ISP account whose OAuth2 login cannot work until the admin signs in again
    (never stored, or refused by the provider), as ``dialmail status`` and the console's
    dashboard show it; the last session's errors may be about something else by now.
    The lines name the account and the command, never a token."""
    logins = [f.oauth for f in config.fetch if f.oauth is not None]
    logins += [config.smarthost.oauth] if config.smarthost.oauth is not None else []
    if not logins:
        return []
    try:
        store = store_for(config)
    except Exception as exc:  # a key file problem: say it, the rest of the status stands
        return [f"tokens unreadable: {exc}"]
    lines = []
    for oauth in logins:
        try:
            rec = store.load(oauth.key)
        except TokenStoreError as exc:
            lines.append(f"{oauth.account}: {exc}")
            continue
        if rec is None:
            lines.append(f"{oauth.account}: no token: run `dialmail oauth login {oauth.account}`")
        elif rec.state == REFUSED:
            lines.append(f"{oauth.account}: {refused_text(oauth.account, rec.error)}")
    return lines
