"""The console's pages: one Starlette app over the running daemon.

Every page reads the spool through the daemon's own objects (off the event loop), and
every change goes through the code the command line uses (``gateway.office.operator``,
``spool.users``, the session runner that ``connect-now`` talks to), so both agree.
Admin pages answer 403 to other users; no page but the login, static files and the mail
client auto-configuration (``autoconfig``) opens without a login.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import re
import shutil
import time
from functools import wraps
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from gateway import control
from gateway.config import parse_duration
from gateway.delivery import listing
from gateway.delivery.stages import quarantine
from gateway.delivery.stages.autoreply import Responder
from gateway.imap.supervisor import reload_users
from gateway.oauth.tokens import sign_ins_needed
from gateway.office import operator
from gateway.office.bounce import read_headers
from gateway.policy.throttle import SharedLockout
from gateway.web import autoconfig, charts, login
from gateway.web.login import Visitor
from gateway.web.progress import SessionFeed
from spool.policystate import PolicyState
from spool.sessions import SessionLog
from spool.users import UserError

HERE = Path(__file__).resolve().parent
COOKIE = "dialmail_console"
MODES = {"both": "both", "send": "send", "fetch": "fetch"}


def _page(admin: bool = False):
    """The endpoint needs a login (a GET without one goes to the login page), and an
    admin's for ``admin``."""
    def wrap(fn):
        @wraps(fn)
        async def endpoint(self: WebConsole, request: Request) -> Response:
            who = login.visitor(request, self.config.web)
            if who is not None and not await asyncio.to_thread(self.users.exists, who.name):
                login.log_out(request)  # deleted since logging in: the cookie is worth nothing now
                who = None
            if who is None:
                if request.method == "GET":
                    return RedirectResponse(f"/login?next={quote(request.url.path)}", 303)
                raise HTTPException(401, "log in first")
            if admin and not who.admin:
                raise HTTPException(403, "this page is for the administrators")
            return await fn(self, request, who)
        return endpoint
    return wrap


class WebConsole:
    def __init__(self, daemon, runner, feed: SessionFeed, secret: str):
        self.daemon = daemon
        self.config = daemon.config
        self.runner = runner
        self.feed = feed
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))
        self.templates.env.globals.update(csrf_field=login.CSRF_FIELD, fmt_day=_day, fmt_time=_time)
        spool = daemon.spool
        self.queue, self.users = spool.queue, spool.users
        self.policy_state = PolicyState(spool.catalogue)
        self.session_log = SessionLog(spool.catalogue)
        secure = self.config.web.tls_cert is not None
        routes = [
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/", self.dashboard, methods=["GET"]),
            Route("/connect-now", self.connect_now, methods=["POST"]),
            Route("/events", self.events, methods=["GET"]),
            Route("/sessions", self.sessions, methods=["GET"]),
            Route("/sessions/{sid:int}/transcript", self.transcript, methods=["GET"]),
            Route("/queue", self.queue_page, methods=["GET"]),
            Route("/queue/flush", self.queue_flush, methods=["POST"]),
            Route("/queue/{qid}", self.queue_message, methods=["GET"]),
            Route("/queue/{qid}/{action}", self.queue_action, methods=["POST"]),
            Route("/quarantine", self.quarantine, methods=["GET"]),
            Route("/quarantine/{key}/delete", self.quarantine_delete, methods=["POST"]),
            Route("/quarantine/{key}/release", self.quarantine_release, methods=["POST"]),
            Route("/users", self.users_page, methods=["GET"]),
            Route("/users", self.user_add, methods=["POST"]),
            Route("/users/{name}/password", self.user_password, methods=["POST"]),
            Route("/users/{name}/delete", self.user_delete, methods=["POST"]),
            Route("/users/{name}/out-of-office", self.user_out_of_office, methods=["POST"]),
            Route("/users/{name}/forwarding", self.user_forwarding, methods=["POST"]),
            Route("/me", self.me, methods=["GET"]),
            Route("/me/password", self.me_password, methods=["POST"]),
            Route("/me/out-of-office", self.me_out_of_office, methods=["POST"]),
            Route("/me/forwarding", self.me_forwarding, methods=["POST"]),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
            *autoconfig.routes(self.config, self.users),
        ]
        self.app = Starlette(routes=routes, middleware=[
            Middleware(SessionMiddleware, secret_key=secret, session_cookie=COOKIE, max_age=12 * 3600,
                       same_site="strict", https_only=secure)])

    # ------------------------------------------------------------ rendering

    def render(self, request: Request, name: str, who: Visitor | None, status_code: int = 200, **context):
        context.update(who=who, csrf=login.csrf_token(request), notice=request.session.pop("notice", None),
                       path=request.url.path)
        return self.templates.TemplateResponse(request, name, context, status_code=status_code)

    @staticmethod
    def back(request: Request, to: str, notice: str | None = None) -> Response:
        if notice:
            request.session["notice"] = notice
        return RedirectResponse(to, 303)

    # ------------------------------------------------------------ login

    async def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html", None, next=_local_path(request.query_params.get("next")))

    async def login(self, request: Request) -> Response:
        form = await login.checked_form(request)
        name = str(form.get("user", "")).strip().lower()
        password = str(form.get("password", ""))
        target = _local_path(form.get("next"))
        # SMTP's and POP3's throttles together: a guesser gets the same lockout on every door.
        throttle = SharedLockout(*self.daemon.login_throttles.values())
        ip = request.client.host if request.client else "?"
        if not throttle.reserve(ip):
            await asyncio.sleep(throttle.delay(ip))
            return self.render(request, "login.html", None, status_code=429, next=target,
                               error="too many failed logins from your address: try again later")
        try:
            ok = bool(name) and await self.users.check(name, password)
        except BaseException:
            throttle.release(ip)
            raise
        if ok and throttle.succeeded(ip):
            login.log_in(request, name)
            return RedirectResponse(target, 303)
        if not ok:
            await asyncio.sleep(throttle.failed(ip))
        return self.render(request, "login.html", None, status_code=401, next=target,
                           error="wrong user name or password")

    async def logout(self, request: Request) -> Response:
        await login.checked_form(request)
        login.log_out(request)
        return RedirectResponse("/login", 303)

    # ------------------------------------------------------------ dashboard and connect now

    @_page()
    async def dashboard(self, request: Request, who: Visitor) -> Response:
        status = await control.status(self.daemon, self.runner)
        now = dt.datetime.now()
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
        log = self.session_log
        today, this_month = await asyncio.gather(asyncio.to_thread(log.since, midnight),
                                                 asyncio.to_thread(log.since, month))
        disk = shutil.disk_usage(self.config.spool_dir)
        following = self.feed.run is not None and self.feed.run.outcome is None
        # OAuth2 logins that fail until an admin signs in again (the account and the command only).
        sign_ins = await asyncio.to_thread(sign_ins_needed, self.config) if who.admin else []
        return self.render(request, "dashboard.html", who, status=status, sign_ins=sign_ins,
                           today=_line_use(today), month=_line_use(this_month), demand=self.config.demand,
                           currency=self.config.session.currency, disk_free=disk.free, disk_total=disk.total,
                           following=following, after=self.feed.runs - 1 if following else self.feed.runs)

    @_page()
    async def connect_now(self, request: Request, who: Visitor) -> Response:
        form = await login.checked_form(request)
        if not who.may_connect:
            raise HTTPException(403, "only the administrators may bring the line up here")
        mode = MODES.get(str(form.get("mode", "both")))
        if mode is None:
            raise HTTPException(400, "mode is both, send or fetch")
        following = self.feed.run is not None and self.feed.run.outcome is None
        after = self.feed.runs - 1 if following else self.feed.runs
        started = self.runner.start("manual", mode)
        message = (f"connect now ({mode}) asked by {who.name}" if started
                   else "a session is already running: following it" if self.runner.busy
                   else "the daemon is stopping: no new session")
        if request.headers.get("hx-request"):
            return self.render(request, "progress.html", who, after=after, message=message)
        return self.back(request, "/", message)

    @_page()
    async def events(self, request: Request, who: Visitor) -> Response:
        """Server-Sent Events: the progress lines of the session after run ``after``."""
        try:
            after = int(request.query_params.get("after", self.feed.runs))
        except ValueError:
            raise HTTPException(400, "after is a number") from None

        async def stream():
            async for kind, text in self.feed.lines(after):
                data = "\n".join(f"data: {part}" for part in text.splitlines() or [""])
                yield f"event: {kind}\n{data}\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ sessions

    @_page(admin=True)
    async def sessions(self, request: Request, who: Visitor) -> Response:
        log = self.session_log
        rows = await asyncio.to_thread(log.last, 200)
        month_ago = time.time() - 30 * 86400
        recent = await asyncio.to_thread(log.since, month_ago)
        return self.render(request, "sessions.html", who, rows=list(reversed(rows)),
                           currency=self.config.session.currency,
                           line_chart=charts.line_time_per_day(recent, self.config.session.currency),
                           bytes_chart=charts.bytes_per_session(rows[-30:]),
                           efficiency_chart=charts.efficiency_per_session(rows[-30:]))

    @_page(admin=True)
    async def transcript(self, request: Request, who: Visitor) -> Response:
        sid = request.path_params["sid"]
        rec = await asyncio.to_thread(self.session_log.get, sid)
        if rec is None or not rec.transcript:
            raise HTTPException(404, f"session {sid} has no transcript")
        path = Path(rec.transcript)
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8", errors="replace")
        except OSError as exc:
            raise HTTPException(404, f"transcript of session {sid}: {exc.strerror}") from None
        return PlainTextResponse(text)

    # ------------------------------------------------------------ queue

    @_page(admin=True)
    async def queue_page(self, request: Request, who: Visitor) -> Response:
        msgs = await asyncio.to_thread(self.queue.messages)
        return self.render(request, "queue.html", who, messages=msgs, now=time.time())

    @_page(admin=True)
    async def queue_message(self, request: Request, who: Visitor) -> Response:
        try:
            msg = await asyncio.to_thread(operator.lookup, self.queue, request.path_params["qid"])
        except operator.NotQueued as exc:
            raise HTTPException(404, str(exc)) from None
        head = await asyncio.to_thread(read_headers, self.queue, msg.id)
        return self.render(request, "message.html", who, msg=msg, headers=head.decode("utf-8", "replace"))

    @_page(admin=True)
    async def queue_action(self, request: Request, who: Visitor) -> Response:
        await login.checked_form(request)
        qid, action = request.path_params["qid"], request.path_params["action"]
        try:
            if action == "hold":
                await asyncio.to_thread(operator.hold, self.queue, qid)
                said = f"{qid}: held"
            elif action == "release":
                changed = await asyncio.to_thread(operator.release, self.queue, qid)
                said = f"{qid}: released" + (" (its body as it is now)" if changed else "")
            elif action == "delete":
                await asyncio.to_thread(operator.delete, self.queue, qid)
                said = f"{qid}: deleted"
            elif action == "bounce":
                msg, settled = await asyncio.to_thread(operator.bounce, self.config, self.queue, qid)
                if settled.local and self.daemon.worker:
                    self.daemon.worker.kick()
                said = f"{qid}: bounced to <{msg.sender}>" if settled.bounce_id else f"{qid}: bounced (null sender)"
            else:
                raise HTTPException(404, f"no action {action!r}")
        except operator.NotQueued as exc:
            return self.back(request, "/queue", str(exc))
        return self.back(request, "/queue", said)

    @_page(admin=True)
    async def queue_flush(self, request: Request, who: Visitor) -> Response:
        """Send everything waiting now, back-off ignored: a send-only session, with progress."""
        await login.checked_form(request)
        count = await asyncio.to_thread(operator.retry_all_now, self.queue)
        started = self.runner.start("flush", "send")
        return self.back(request, "/", f"flush: {count} message(s) go now" if started
                         else "a session is already running: the messages go with it")

    # ------------------------------------------------------------ quarantine

    @_page(admin=True)
    async def quarantine(self, request: Request, who: Visitor) -> Response:
        items = await asyncio.to_thread(quarantine.kept, self.config.spool_dir)
        return self.render(request, "quarantine.html", who, items=items)

    @_page(admin=True)
    async def quarantine_delete(self, request: Request, who: Visitor) -> Response:
        await login.checked_form(request)
        key = request.path_params["key"]
        try:
            await asyncio.to_thread(quarantine.delete, self.config.spool_dir, key)
        except quarantine.NotQuarantined as exc:
            return self.back(request, "/quarantine", str(exc))
        return self.back(request, "/quarantine", f"{key}: deleted")

    @_page(admin=True)
    async def quarantine_release(self, request: Request, who: Visitor) -> Response:
        """Deliver a quarantined message to whom it was for, past the check that stopped it."""
        await login.checked_form(request)
        key = request.path_params["key"]
        try:
            path = await asyncio.to_thread(quarantine.find, self.config.spool_dir, key)
            qid = await asyncio.to_thread(quarantine.release, self.queue, self.daemon.spool.directory, path)
        except quarantine.NotQuarantined as exc:
            return self.back(request, "/quarantine", str(exc))
        if self.daemon.worker:
            self.daemon.worker.kick()
        return self.back(request, "/quarantine", f"{key}: released as {qid}")

    # ------------------------------------------------------------ users (admin)

    async def _change_users(self, change, *args):
        """A change to the users file, then a managed Dovecot told to read it, as the CLI's
        user commands do: IMAP logins follow from the very next one."""
        def changed():
            result = change(*args)
            reload_users(self.config)
            return result
        return await asyncio.to_thread(changed)

    @_page(admin=True)
    async def users_page(self, request: Request, who: Visitor) -> Response:
        names = await asyncio.to_thread(self.users.names)
        vacations = {v.user: v for v in await asyncio.to_thread(self.policy_state.vacations)}
        responder = Responder(self.config, self.queue, self.daemon.spool.directory, self.policy_state)
        where = await asyncio.to_thread(listing.lines, self.config, self.daemon.spool.directory, responder)
        directory = self.daemon.spool.directory
        forwards = await asyncio.to_thread(
            lambda: {n: directory.forward_of(n, self.policy_state.forward) for n in names})
        return self.render(request, "users.html", who, names=names, vacations=vacations,
                           admins=self.config.web.admins, forwards=forwards, listing="\n".join(where))

    @_page(admin=True)
    async def user_add(self, request: Request, who: Visitor) -> Response:
        form = await login.checked_form(request)
        name, password = str(form.get("user", "")), str(form.get("password", ""))
        if not password:
            return self.back(request, "/users", "give the new user a password")
        try:
            added = await self._change_users(operator.add_user, self.config, self.users, name, password)
        except UserError as exc:
            return self.back(request, "/users", str(exc))
        return self.back(request, "/users", f"user {added} added")

    @_page(admin=True)
    async def user_password(self, request: Request, who: Visitor) -> Response:
        form = await login.checked_form(request)
        name, password = request.path_params["name"], str(form.get("password", ""))
        if not password:
            return self.back(request, "/users", "give a password")
        try:
            await self._change_users(self.users.set_password, name, password)
        except UserError as exc:
            return self.back(request, "/users", str(exc))
        return self.back(request, "/users", f"password of {name} changed")

    @_page(admin=True)
    async def user_delete(self, request: Request, who: Visitor) -> Response:
        await login.checked_form(request)
        name = request.path_params["name"]
        try:
            await self._change_users(self.users.delete, name)
        except UserError as exc:
            return self.back(request, "/users", str(exc))
        return self.back(request, "/users", f"user {name} deleted (mailbox kept)")

    @_page(admin=True)
    async def user_out_of_office(self, request: Request, who: Visitor) -> Response:
        form = await login.checked_form(request)
        said = await self._set_out_of_office(request.path_params["name"], form)
        return self.back(request, "/users", said)

    @_page(admin=True)
    async def user_forwarding(self, request: Request, who: Visitor) -> Response:
        form = await login.checked_form(request)
        return self.back(request, "/users", await self._set_forwarding(request.path_params["name"], form))

    # ------------------------------------------------------------ self-service

    @_page()
    async def me(self, request: Request, who: Visitor) -> Response:
        vac = await asyncio.to_thread(self.policy_state.vacation, who.name)
        fwd = await asyncio.to_thread(self.daemon.spool.directory.forward_of, who.name, self.policy_state.forward)
        return self.render(request, "me.html", who, vacation=vac, forward=fwd)

    @_page()
    async def me_password(self, request: Request, who: Visitor) -> Response:
        form = await login.checked_form(request)
        old, new = str(form.get("old", "")), str(form.get("new", ""))
        if not new:
            return self.back(request, "/me", "give a new password")
        if not await self.users.check(who.name, old):
            return self.back(request, "/me", "the old password is wrong: nothing changed")
        await self._change_users(self.users.set_password, who.name, new)
        return self.back(request, "/me", "your password is changed")

    @_page()
    async def me_out_of_office(self, request: Request, who: Visitor) -> Response:
        form = await login.checked_form(request)
        return self.back(request, "/me", await self._set_out_of_office(who.name, form))

    @_page()
    async def me_forwarding(self, request: Request, who: Visitor) -> Response:
        """The visitor's own forwarding only: the name comes from the session, never the form."""
        form = await login.checked_form(request)
        return self.back(request, "/me", await self._set_forwarding(who.name, form))

    async def _set_forwarding(self, user: str, form) -> str:
        to = [t for t in re.split(r"[,\s]+", str(form.get("to", ""))) if t]
        try:
            if form.get("enabled") != "on":
                await asyncio.to_thread(operator.forwarding_off, self.users, self.policy_state, user)
                return f"forwarding of {user} is off"
            done = await asyncio.to_thread(operator.set_forwarding, self.daemon.spool.directory,
                                           self.policy_state, user, to, form.get("keep") == "on")
        except ValueError as exc:  # UserError is one
            return f"forwarding not changed: {exc}"
        return f"mail to {user} goes to {', '.join(done)}{', keeping a copy' if form.get('keep') == 'on' else ''}"

    async def _set_out_of_office(self, user: str, form) -> str:
        if form.get("enabled") != "on":
            try:
                await asyncio.to_thread(operator.out_of_office_off, self.policy_state, self.users, user)
            except UserError as exc:
                return str(exc)
            return f"out-of-office of {user} is off"
        try:
            every = parse_duration(str(form["every"])) if form.get("every") else None
            ooo = operator.OutOfOffice(subject=str(form.get("subject") or "Out of office"),
                                       body=str(form.get("body", "")), start=str(form.get("start") or "") or None,
                                       end=str(form.get("end") or "") or None, every=every)
            await asyncio.to_thread(operator.set_out_of_office, self.policy_state, self.users, user, ooo)
        except ValueError as exc:  # UserError is one
            return f"out-of-office not changed: {exc}"
        return f"out-of-office of {user} is on"


def _local_path(target) -> str:
    """Where to go after login: a path on this console, never another site."""
    target = str(target or "/")
    # "//host" and "/\\host" are other sites to a browser.
    return target if target.startswith("/") and not target.startswith(("//", "/\\")) else "/"


def _day(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d")


def _time(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def _line_use(records) -> dict:
    return {"sessions": len(records), "minutes": sum(r.connected_seconds for r in records) / 60,
            "cost": sum(r.cost for r in records)}
