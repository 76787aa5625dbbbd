"""A dial session: link up, move the mail both ways at once, hang up, account for it.

    lock -> before hook -> link up (redial policy of the backend) -> [ETRN]
         -> relay flush  ||  IMAP fetch      (concurrently: the line carries both ways)
         -> hang up when both are drained, or idle, or at max_time, or on carrier loss
         -> after hook -> local delivery of what was fetched -> session record

An interrupt (Ctrl-C or SIGTERM to the process running the session, ``dialmail
hangup``) ends the session as max_time does: online, both sides stop at the next safe
point and the line is hung up; before that (hook, dialing) the step is cut short.  The
session is then logged "interrupted", with what it was doing and who interrupted it.

Being offline is not a failure: nothing here runs unless a session was asked for, and
a refused or failed dial never counts against a message (only wall-clock queue lifetime
does, see gateway.relay.flush).  A carrier drop stops both sides at a message boundary the
spool can resume from; the caller schedules a bounded retry.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from gateway.config import Config
from spool.sessions import SessionBusy, SessionLock, SessionLog, SessionRecord

log = logging.getLogger("dialmail.session")

Event = dict[str, Any]
Emit = Callable[[Event], None]

MODES = ("both", "send", "fetch")
STOP_GRACE = 15.0  # seconds the two sides get to stop cleanly after max_time


@dataclass
class SessionContext:
    """What a session needs from the process running it (daemon or CLI)."""
    config: Config
    spool: Any                     # gateway.daemon.Spool
    kick_delivery: Callable[[], None] | None = None  # the daemon's local delivery worker


_SECRET = re.compile(r"(?i)(pass(word)?|auth\s+(plain|login)|login)(\s+\S+\s*)(\S+)")


def mask(text: str) -> str:
    """Hide anything that looks like a credential in a transcript line."""
    return _SECRET.sub(lambda m: m.group(1) + m.group(4) + "********", text)


class Transcript:
    """The modem dialogue and protocol summary of one session, kept for troubleshooting."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        for line in str(text).splitlines() or [""]:
            self.file.write(f"{stamp} {mask(line)}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class _DialogueHandler(logging.Handler):
    """Copies the modem's AT dialogue (modem.dialogue logger) into the session transcript."""

    def __init__(self, transcript: Transcript):
        super().__init__(logging.DEBUG)
        self.transcript = transcript

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.transcript.write("[at] " + record.getMessage())
        except Exception:
            self.handleError(record)


class Session:
    def __init__(self, ctx: SessionContext, trigger: str, mode: str = "both", emit: Emit | None = None,
                 clock: Callable[[], float] = time.time):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.ctx = ctx
        self.config = ctx.config
        self.record = SessionRecord(trigger=trigger, mode=mode, started=clock())
        self.emit_cb = emit or (lambda event: None)
        self.clock = clock
        self.stop = asyncio.Event()
        self.stop_reason: str | None = None
        self.last_activity = time.monotonic()
        self.transcript: Transcript | None = None
        self.carrier_lost = False
        self.phase = "starting"
        self.interrupted_by: str | None = None
        self.interrupted_while: str | None = None
        self._task: asyncio.Task | None = None
        self._cut = False  # interrupt() cancelled this session's own task

    # ------------------------------------------------------------ events

    def emit(self, type_: str, **data) -> None:
        event = {"type": type_, **data}
        self.last_activity = time.monotonic()
        if self.transcript is not None:
            self.transcript.write(_describe(event))
        try:
            self.emit_cb(event)
        except Exception:  # a broken progress display must never break the session
            log.exception("progress callback failed")

    def halt(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()
            self.emit("stopping", reason=reason)

    def interrupt(self, by: str) -> None:
        """End the session early because ``by`` asked (Ctrl-C, SIGTERM, dialmail hangup).

        Online, both sides stop at the next safe point, as at max_time: the relay
        abandons the message in flight (it stays queued) and the fetch stops between
        messages; then the line is hung up.  A before-session command or a dial still
        in progress has nothing to keep, so it is cut short at once.
        """
        if self.interrupted_by is not None:
            return
        self.interrupted_by = by
        self.interrupted_while = self.phase
        self.halt(f"interrupted by {by} while {self.phase}")
        if self.phase in ("running the before-session command", "dialing") and self._task is not None:
            self._cut = True
            self._task.cancel()

    # ------------------------------------------------------------ the session

    async def run(self) -> SessionRecord:
        cfg = self.config
        rec = self.record
        self._task = asyncio.current_task()
        lock = SessionLock(cfg.spool_dir)
        try:
            lock.acquire()
        except SessionBusy as exc:
            rec.outcome = "refused"
            rec.errors.append(str(exc))
            rec.ended = self.clock()
            self.emit("refused", reason=str(exc))
            return rec
        slog = SessionLog(self.ctx.spool.catalogue)
        sid = slog.start(rec)
        self.transcript = Transcript(cfg.spool_dir / "sessions" / f"{sid:06d}.log")
        rec.transcript = str(self.transcript.path)
        self.emit("session", id=sid, trigger=rec.trigger, mode=rec.mode)
        dialogue = logging.getLogger("modem.dialogue")
        handler = _DialogueHandler(self.transcript)
        dialogue.addHandler(handler)
        dialogue.setLevel(logging.DEBUG)
        dialogue.propagate = False
        try:
            self.phase = "running the before-session command"
            await self._hook("before", cfg.session.before)
            deadline = asyncio.create_task(self._deadline(cfg.session.max_time))
            try:
                # At max_time both sides are asked to stop at the next safe point (the
                # relay abandons the message in flight, which stays queued); only if they
                # do not within the grace period is the session cut off outright.
                async with asyncio.timeout(cfg.session.max_time + STOP_GRACE):
                    await self._online()
            except TimeoutError:
                rec.errors.append(f"the session did not stop within {STOP_GRACE}s of max_time; cut off")
                self.emit("error", message=rec.errors[-1])
            finally:
                deadline.cancel()
            self.phase = "running the after-session command"
            await self._hook("after", cfg.session.after)
            self.phase = "delivering the fetched mail"
            await self._deliver_fetched()
        except asyncio.CancelledError:
            # Either interrupt() cut a dial or hook short (then the session ends here as
            # usual), or the process is stopping the session outright (a second Ctrl-C, a
            # shutdown past its grace period): the record is completed all the same.
            if self._cut and self._task.uncancel() == 0:
                self._cut = False
            else:
                if self.interrupted_by is None:
                    self.interrupted_by, self.interrupted_while = "the process stopping", self.phase
                rec.errors.append(f"cut off while {self.phase}")
                raise
        except Exception as exc:  # the record must be completed whatever happened
            log.exception("session %d failed", sid)
            rec.errors.append(f"internal error: {exc}")
        finally:
            if self.interrupted_by is not None:
                rec.errors.insert(0, f"interrupted by {self.interrupted_by} while {self.interrupted_while}; "
                                     f"what was not sent or fetched waits for the next session")
            rec.ended = self.clock()
            if rec.hung_up_at is None and rec.connected_at is not None:
                rec.hung_up_at = rec.ended
            minutes = math.ceil(rec.connected_seconds / 60) if rec.connected_at else 0
            rec.cost = round(cfg.session.cost_per_call * (1 if rec.connected_at else 0)
                             + cfg.session.cost_per_minute * minutes, 4)
            rec.outcome = self._outcome()
            slog.update(sid, rec)
            self.emit("done", id=sid, outcome=rec.outcome, record=_summary(rec))
            dialogue.removeHandler(handler)
            self.transcript.close()
            lock.release()
        return rec

    async def _deadline(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.record.errors.append(f"maximum session time of {seconds}s reached; the rest waits for the next "
                                  f"session")
        self.emit("error", message=self.record.errors[-1])
        self.halt("maximum session time reached")

    def _outcome(self) -> str:
        rec = self.record
        if self.interrupted_by is not None:
            return "interrupted"
        if rec.connected_at is None:
            return "failed"
        if self.carrier_lost or rec.errors:
            return "partial"
        return "ok"

    async def _online(self) -> None:
        from modem.errors import LinkError
        from modem.link import open_link
        cfg = self.config
        rec = self.record
        settings = cfg.link.settings
        if settings is None:
            from modem.settings import LinkSettings
            settings = LinkSettings.from_options(cfg.link.type, cfg.link.options)
        link = open_link(settings, progress=self._dialogue)
        self.phase = "dialing"
        self.emit("dialing", backend=cfg.link.type)
        try:
            async with link.up() as info:
                self.phase = {"both": "sending and fetching", "send": "sending",
                                 "fetch": "fetching"}[rec.mode]
                rec.connected_at = self.clock()
                rec.connect_rate = info.rate
                self.emit("connected", rate=info.rate, description=info.describe())
                watch = asyncio.create_task(self._watch(info))
                try:
                    await self._move_mail(info)
                finally:
                    watch.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watch
                    if info.bytes_up is not None:
                        rec.bytes_up, rec.bytes_down = info.bytes_up, info.bytes_down or 0
                    rec.hung_up_at = self.clock()
                    self.phase = "hanging up"
                self.emit("hangup")
            if info.hangup:
                self.emit("hungup", how=info.hangup)
        except LinkError as exc:
            rec.errors.append(str(exc))
            self.emit("error", message=str(exc))

    def _dialogue(self, text: str) -> None:
        if _is_dial_result(text):
            self.record.dial_attempts.append(mask(text))
        self.emit("modem", text=mask(text))

    async def _watch(self, info) -> None:
        """Stop both sides on carrier loss or when nothing moved for idle_timeout."""
        idle = self.config.session.idle_timeout
        last_bytes = None
        while not self.stop.is_set():
            if info.carrier_lost.is_set():
                self.carrier_lost = True
                reason = info.loss_reason or "carrier lost"
                self.record.errors.append(f"carrier lost: {reason}")
                self.halt(f"carrier lost: {reason}")
                return
            counters = (info.bytes_up, info.bytes_down)
            if counters != last_bytes:
                last_bytes = counters
                self.last_activity = time.monotonic()
            if idle and time.monotonic() - self.last_activity > idle:
                self.record.errors.append(f"nothing moved for {idle}s; hung up")
                self.halt("idle timeout")
                return
            try:
                await asyncio.wait_for(info.carrier_lost.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    async def _move_mail(self, info) -> None:
        cfg = self.config
        jobs = []
        if cfg.session.etrn_domains and self.record.mode != "fetch":
            await self._etrn()
        if self.record.mode in ("both", "send"):
            jobs.append(self._send())
        if self.record.mode in ("both", "fetch") and cfg.fetch:
            jobs.append(self._fetch())
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                msg = f"{type(res).__name__}: {res}"
                self.record.errors.append(msg)
                self.emit("error", message=msg)
        # When the line dropped, whatever the two sides report is secondary.
        if info.carrier_lost.is_set() and not self.carrier_lost:
            self.carrier_lost = True
            self.record.errors.append(f"carrier lost: {info.loss_reason}")

    async def _send(self) -> None:
        from gateway.relay import flush as relay
        spool = self.ctx.spool
        # A session someone asked for, or the retry after a dropped line, sends everything
        # waiting (as postqueue -f does); scheduled and demand sessions respect back-off.
        force = self.record.trigger in ("manual", "retry", "flush")
        result = await relay.flush(self.config, spool.queue, clock=self.clock, progress=self._send_progress,
                                   stop_event=self.stop, force=force, on_local_mail=self.ctx.kick_delivery)
        self.record.sent += result.sent
        self.record.deferred += result.deferred
        self.record.bounced += result.bounced
        why = None
        if result.error is not None:
            why = f"send: {result.error.reply}"
            self.record.errors.append(why)
        # The reason goes with the counts: "7 deferred" alone leaves the admin guessing.
        self.emit("send-done", sent=result.sent, deferred=result.deferred, bounced=result.bounced,
                  bytes=result.bytes, error=why)

    def _send_progress(self, p) -> None:  # gateway.relay.SendProgress
        self.emit("send", qid=p.qid, size=p.size, total=p.total, seconds=round(p.seconds, 2),
                  done=p.messages, left=p.remaining)

    async def _fetch(self) -> None:
        from gateway.fetch import imap as fetch
        spool = self.ctx.spool
        result = await fetch.fetch_all(self.config, spool.queue, spool.catalogue, spool.directory,
                                       clock=self.clock, progress=self._fetch_progress, stop_event=self.stop)
        self.record.fetched += result.fetched
        self.record.fetched_bytes += getattr(result, "bytes", 0)
        whys = [f"fetch: {err}" for err in getattr(result, "errors", []) or []]
        self.record.errors.extend(whys)
        if result.fetched and self.ctx.kick_delivery:
            self.ctx.kick_delivery()
        self.emit("fetch-done", fetched=result.fetched, errors=whys)

    def _fetch_progress(self, p) -> None:  # gateway.fetch.FetchProgress
        if p.partial:
            self.emit("fetch-piece", uid=p.uid, size=p.size, done_bytes=p.done_bytes)
            return
        self.emit("fetch", uid=f"{p.account}/{p.folder}/{p.uid}", size=p.size, total=p.bytes,
                  done=p.messages, left=max(0, p.planned_messages - p.messages))

    async def _etrn(self) -> None:
        """Ask the ISP to release mail it holds for us (RFC 1985); failures are only noted."""
        import aiosmtplib
        sh = self.config.smarthost
        try:
            async with aiosmtplib.SMTP(hostname=sh.host, port=sh.port, timeout=30,
                                       local_hostname=self.config.server.hostname, start_tls=False) as smtp:
                await smtp.ehlo()
                for domain in self.config.session.etrn_domains:
                    resp = await smtp.execute_command(f"ETRN {domain}".encode())
                    self.emit("etrn", domain=domain, code=resp.code, reply=resp.message)
        except Exception as exc:
            self.emit("etrn", error=str(exc))

    async def _hook(self, which: str, command: str | None) -> None:
        if not command:
            return
        proc = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.PIPE,
                                                     stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
        except asyncio.CancelledError:  # the session was interrupted: the command goes with it
            proc.kill()
            await proc.wait()
            raise
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            self.record.errors.append(f"{which}-session command timed out: {command}")
            return
        self.emit("hook", which=which, command=command, status=proc.returncode,
                  output=out.decode(errors="replace")[-500:])
        if proc.returncode:
            self.record.errors.append(f"{which}-session command exited with {proc.returncode}: {command}")

    async def _deliver_fetched(self) -> None:
        if self.ctx.kick_delivery is not None:
            self.ctx.kick_delivery()
            return
        delivery = self.ctx.spool.delivery
        while await asyncio.to_thread(delivery.run_once):
            pass


def _is_dial_result(text: str) -> bool:
    return bool(re.search(r"\b(CONNECT|BUSY|NO CARRIER|NO DIALTONE|NO ANSWER|ERROR|timed out|dialling|dialing)\b",
                          text, re.I))


def _describe(event: Event) -> str:
    kind = event.get("type")
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("type", "record"))
    return f"[{kind}] {rest}"


def _summary(rec: SessionRecord) -> dict:
    return {"trigger": rec.trigger, "mode": rec.mode, "outcome": rec.outcome, "rate": rec.connect_rate,
            "connected_seconds": round(rec.connected_seconds, 1), "sent": rec.sent, "deferred": rec.deferred,
            "bounced": rec.bounced, "fetched": rec.fetched, "bytes_up": rec.bytes_up,
            "bytes_down": rec.bytes_down, "cost": rec.cost, "errors": rec.errors}


class SessionControl:
    """The handle a process keeps on its sessions: interrupt the running one, skip retries."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.active = False  # run_with_retries is under way (a session, or the wait between tries)
        self.interrupted_by: str | None = None
        self._interrupted = asyncio.Event()

    def interrupt(self, by: str) -> bool:
        """End the running session at a safe point and try no more; False if none runs."""
        if not self.active:
            return False
        if self.interrupted_by is None:
            self.interrupted_by = by
            self._interrupted.set()
        if self.session is not None:
            self.session.interrupt(by)
        return True

    async def run(self, session: Session) -> SessionRecord:
        self.session = session
        try:
            return await session.run()
        finally:
            self.session = None

    async def pause(self, seconds: float, sleep=asyncio.sleep) -> bool:
        """Wait between tries; False when an interrupt came meanwhile."""
        waiting = asyncio.ensure_future(sleep(seconds))
        woken = asyncio.ensure_future(self._interrupted.wait())
        try:
            await asyncio.wait({waiting, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            woken.cancel()
        return self.interrupted_by is None


async def run_with_retries(ctx: SessionContext, trigger: str, mode: str = "both", emit: Emit | None = None,
                           sleep=asyncio.sleep, control: SessionControl | None = None) -> SessionRecord:
    """Run a session; after a carrier drop try again ``retry_count`` times, ``retry_delay`` apart.

    ``control`` lets the caller interrupt the session; an interrupt also ends the retries.
    """
    cfg = ctx.config.session
    control = control or SessionControl()
    control.active = True
    try:
        rec = await control.run(Session(ctx, trigger, mode, emit))
        tries = 0
        while rec.outcome == "partial" and any(e.startswith("carrier lost") for e in rec.errors) \
                and tries < cfg.retry_count and control.interrupted_by is None:
            tries += 1
            if emit:
                emit({"type": "retry", "in": cfg.retry_delay, "attempt": tries, "of": cfg.retry_count})
            if not await control.pause(cfg.retry_delay, sleep):
                if emit:
                    emit({"type": "info", "message": f"no further try: interrupted by {control.interrupted_by}"})
                break
            rec = await control.run(Session(ctx, "retry", mode, emit))
        return rec
    finally:
        control.active = False
