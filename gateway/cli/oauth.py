"""``dialmail oauth``: the OAuth2 tokens of ISP accounts that log in by token, not password."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from gateway.cli.app import (
    EX_CONFIG,
    EX_USAGE,
    explained,
    fail,
    state,
)

oauth_app = typer.Typer(help="OAuth2 tokens for ISP accounts (Microsoft 365, Gmail, others).", no_args_is_help=True)


def _accounts(cfg) -> dict:
    found = {f.name: f.oauth for f in cfg.fetch if f.oauth is not None}
    if cfg.smarthost.oauth is not None:
        found.setdefault("smarthost", cfg.smarthost.oauth)
    return found


def _store(cfg):
    from gateway.oauth.tokens import store_for
    return store_for(cfg)


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch)) if epoch else "-"


@oauth_app.command("login")
@explained
def oauth_login(ctx: typer.Context, name: str,
                refresh_token_stdin: Annotated[bool, typer.Option(
                    "--refresh-token-stdin", help="Store a refresh token obtained elsewhere (e.g. from getmail), "
                                                  "read from the first line of stdin.")] = False,
                device: Annotated[bool, typer.Option("--device", help="Use the device-code flow (the default "
                                                     "for Microsoft).")] = False,
                browser: Annotated[bool, typer.Option("--browser", help="Use the browser (loopback redirect) "
                                                      "flow (the default for Google).")] = False,
                no_open: Annotated[bool, typer.Option("--no-open", help="Only print the sign-in address; do "
                                                      "not start a browser.")] = False,
                port: Annotated[int, typer.Option("--port", help="Port on 127.0.0.1 for the browser flow's "
                                                  "redirect (default: any free one).")] = 0):
    """Sign in once for account NAME (the name of a fetch account, or "smarthost") and store its refresh token."""
    from gateway.oauth import login as flows
    from gateway.oauth.tokens import record_from
    from spool.tokens import TokenRecord, TokenStoreError
    cfg = state(ctx).config()
    accounts = _accounts(cfg)
    if name not in accounts:
        fail(f"no account named {name!r} logs in by OAuth2 (have: {', '.join(accounts) or 'none'}); set "
             f"auth = \"xoauth2\" or \"oauthbearer\" and an oauth table for it", EX_USAGE)
    oauth = accounts[name]
    store = _store(cfg)
    now = time.time()
    if refresh_token_stdin:
        token = sys.stdin.readline().strip()
        if not token:
            fail("no refresh token on stdin", EX_USAGE)
        record = TokenRecord(refresh_token=token, stored_at=now)
        how = "stored; it is checked at the next session, when the line is up"
    else:
        if device and browser:
            fail("choose --device or --browser, not both", EX_USAGE)
        use_device = device or (not browser and oauth.device_url is not None and oauth.provider != "google")
        if use_device:
            def show_code(code: flows.DeviceCode) -> None:
                typer.echo(code.message or f"To sign in, open {code.verification_uri} and enter the code "
                                           f"{code.user_code}")
                typer.echo(f"(waiting up to {code.expires_in // 60} minutes for the approval)")
                sys.stdout.flush()
            answer = flows.device_flow(oauth, show_code)
        else:
            def show_url(url: str) -> None:
                typer.echo(f"Sign in at this address (dialmail waits for the browser to come back):\n{url}")
                sys.stdout.flush()
                if not no_open:
                    import webbrowser
                    webbrowser.open(url)
            answer = flows.browser_flow(oauth, show_url, port=port)
        record = record_from(answer, now)
        if not record.refresh_token:
            fail("the provider gave no refresh token: for Microsoft ask for the offline_access scope; for "
                 "Google the consent screen must be shown again (remove the app's access and log in again)",
                 EX_CONFIG)
        how = f"signed in; the access token is good until {_when(record.expires_at)}"
    try:
        store.save(oauth.key, record)
    except (TokenStoreError, OSError) as exc:
        fail(f"cannot store the token: {exc}", EX_CONFIG)
    typer.echo(f"{name}: refresh token {how}")


@oauth_app.command("status")
@explained
def oauth_status(ctx: typer.Context):
    """Each OAuth2 account's token state and expiry (never the token itself)."""
    from spool.tokens import REFUSED, TokenStoreError
    cfg = state(ctx).config()
    accounts = _accounts(cfg)
    if not accounts:
        typer.echo("no account logs in by OAuth2")
        return
    store = _store(cfg)
    now = time.time()
    bad = False
    for name, oauth in accounts.items():
        try:
            rec = store.load(oauth.key)
        except TokenStoreError as exc:
            typer.echo(f"{name}: unusable: {exc}")
            bad = True
            continue
        if rec is None:
            typer.echo(f"{name} ({oauth.provider}): no token: run `dialmail oauth login {name}`")
            bad = True
        elif rec.state == REFUSED:
            typer.echo(f"{name} ({oauth.provider}): refused by the provider ({rec.error}): run "
                       f"`dialmail oauth login {name}`")
            bad = True
        else:
            access = ("valid until " + _when(rec.expires_at)) if rec.access_usable(now, 0) else \
                "expired (refreshed at the next session)" if rec.access_token else "none yet (got at the next session)"
            typer.echo(f"{name} ({oauth.provider}): refresh token stored {_when(rec.stored_at)}; "
                       f"access token {access}")
    if bad:
        raise typer.Exit(1)


@oauth_app.command("new-key")
@explained
def oauth_new_key(path: Path):
    """Write a new key file for token_key_file (tokens stored after that are encrypted)."""
    from cryptography.fernet import Fernet
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(f"{path} exists; a new key would make the tokens encrypted with it unreadable", EX_USAGE)
    except OSError as exc:
        fail(f"cannot create {path}: {exc.strerror}", EX_CONFIG)
    with os.fdopen(fd, "wb") as f:
        f.write(Fernet.generate_key() + b"\n")
    typer.echo(f"key written to {path}; set [server] token_key_file = \"{path}\"")
