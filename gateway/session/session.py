"""A dial session: link up, move the mail both ways at once, hang up, account for it.

    lock -> before hook -> link up (redial policy of the backend) -> [ETRN]
         -> relay flush  ||  IMAP fetch  ||  [the mail ETRN released, by SMTP]
         -> hang up when both are drained, or idle, or at max_time, or on carrier loss
         -> after hook -> local delivery of what was fetched -> session record

An interrupt (Ctrl-C or SIGTERM to the process running the session, ``dialmail
hangup``) ends the session as max_time does: online, both sides stop at the next safe
point (the relay finishes the message in flight, the fetch the one it is taking) and the
line is hung up; before that (hook, dialing) the step is cut short.  The session is then
logged "interrupted", with what it was doing, who interrupted it and what it moved.

Whatever ends a session (an error, a full disk under the session log or the transcript,
a cancellation), the session lock is given back: the next session is never refused by
one that is over.

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
from typing import Any, Callable

from gateway.config import Config
from gateway.session import link
from gateway.session.events import (
    Done,
    Error,
    Etrn,
    EtrnFailed,
    Event,
    FetchDone,
    Fetched,
    FetchedPiece,
    Hook,
    Info,
    ModemLine,
    Refused,
    Retry,
    SendDone,
    Sent,
    Started,
    Stopping,
    Summary,
)
from gateway.session.transcript import Transcript
from modem.errors import LinkError
from spool.clock import boot_id, uptime
from spool.fsio import is_disk_full
from spool.sessions import SessionBusy, SessionLock, SessionLog, SessionRecord

log = logging.getLogger("dialmail.session")

Emit = Callable[[Event], None]

MODES = ("both", "send", "fetch")
STOP_GRACE = 15.0  # seconds the two sides get to stop cleanly after max_time


@dataclass
class SessionContext:
    """What a session needs from the process running it (daemon or CLI)."""
    config: Config
    spool: Any                     # gateway.daemon.Spool
    kick_delivery: Callable[[], None] | None = None  # the daemon's local delivery worker
    inbound: "InboundSmtp | None" = None  # the daemon's SMTP listener; None: nothing can arrive


@dataclass
class InboundSmtp:
    """What the session needs to know of the SMTP listener to wait for mail released by ETRN."""
    connections: Callable[[], int]   # SMTP connections open now
    accepted: Callable[[], int]      # messages accepted since the daemon started


ETRN_QUIET = 2.0  # seconds without an SMTP connection after which the ISP is taken to be done


class Session:
    def __init__(self, ctx: SessionContext, trigger: str, mode: str = "both", emit: Emit | None = None,
                 clock: Callable[[], float] = time.time):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        self.ctx = ctx
        self.config = ctx.config
        self.record = SessionRecord(trigger=trigger, mode=mode, started=clock(), boot=boot_id(),
                                    started_uptime=uptime())
        self.emit_cb = emit or (lambda event: None)
        self.clock = clock
        self.stop = asyncio.Event()  # stop at the next safe point
        self.line_gone = asyncio.Event()  # carrier lost or idle: abandon what is in flight
        self.stop_reason: str | None = None
        self.last_activity = time.monotonic()
        self.transcript: Transcript | None = None
        self.phase = "starting"
        self.interrupted_by: str | None = None
        self.interrupted_while: str | None = None
        self.etrn_asked: tuple[float, int] | None = None  # monotonic time, messages accepted then
        self._task: asyncio.Task | None = None
        self._cut = False  # interrupt() cancelled this session's own task
        self._fetched_so_far = [0, 0]  # messages and bytes spooled, from the fetch's progress reports

    # ------------------------------------------------------------ events

    def emit(self, event: Event) -> None:
        self.last_activity = time.monotonic()
        if self.transcript is not None:
            try:
                self.transcript.event(event)
            except OSError as exc:  # a full disk: the transcript is given up, never the session
                log.warning("session transcript %s abandoned: %s", self.transcript.path, exc)
                self.record.errors.append(f"transcript abandoned: {exc.strerror or exc}")
                self.transcript = None
        try:
            self.emit_cb(event)
        except Exception:  # a broken progress display must never break the session
            log.exception("progress callback failed")

    def halt(self, reason: str) -> None:
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()
            self.emit(Stopping(reason))

    def interrupt(self, by: str) -> None:
        """End the session early because ``by`` asked (Ctrl-C, SIGTERM, dialmail hangup).

        Online, both sides stop at the next safe point, as at max_time: the relay
        finishes the message in flight (abandoned after its final dot it would be sent
        again) and the fetch stops between messages; then the line is hung up.  A before-session command or a dial still
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
        rec = self.record
        self._task = asyncio.current_task()
        lock = SessionLock(self.config.spool_dir)
        try:
            lock.acquire()
        except SessionBusy as exc:
            rec.outcome = "refused"
            rec.errors.append(str(exc))
            rec.ended = self.clock()
            self.emit(Refused(str(exc)))
            return rec
        except OSError as exc:  # a full disk refuses even the lock file's pid
            return self._not_started(f"cannot take the session lock: {exc.strerror or exc}")
        try:
            try:
                slog = SessionLog(self.ctx.spool.catalogue)
                sid = slog.start(rec)
                transcript = Transcript(self.config.spool_dir / "sessions" / f"{sid:06d}.log")
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                # No session without a record of it; the lock goes at once (below).
                return self._not_started(f"cannot start the session log: {exc}")
            # Whatever ends the session (an error, an interrupt, a cancellation), the
            # modem.dialogue logger is given back as it was and the transcript closed
            # before the lock goes: the next session starts with nothing of this one.
            with transcript, transcript.dialogue():
                self.transcript = transcript
                rec.transcript = str(transcript.path)
                try:
                    await self._logged(sid, slog)
                finally:
                    self.transcript = None
        finally:
            lock.release()
        return rec

    def _not_started(self, why: str) -> SessionRecord:
        rec = self.record
        log.error("session not started: %s", why)
        rec.outcome = "failed"
        rec.errors.append(why)
        rec.ended = self.clock()
        self.emit(Error(why))
        return rec

    async def _logged(self, sid: int, slog: SessionLog) -> None:
        """The session once it holds the line and has a number: the record is completed whatever happens."""
        cfg = self.config
        rec = self.record
        self.emit(Started(sid, rec.trigger, rec.mode))
        try:
            self.phase = "running the before-session command"
            await self._hook("before", cfg.session.before)
            deadline = asyncio.create_task(self._deadline(cfg.session.max_time))
            try:
                # At max_time both sides are asked to stop at the next safe point (the
                # relay finishes the message in flight); only if they do not within the
                # grace period is the session cut off outright.
                async with asyncio.timeout(cfg.session.max_time + STOP_GRACE):
                    await self._online()
            except TimeoutError:
                rec.errors.append(f"the session did not stop within {STOP_GRACE}s of max_time; cut off")
                self.emit(Error(rec.errors[-1]))
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
            try:
                slog.update(sid, rec)
            except Exception as exc:
                if not is_disk_full(exc):
                    raise
                # The session still ends (the lock goes, Done is sent) and says so.
                log.error("session %d: its record could not be stored: %s", sid, exc)
                rec.errors.append(f"the session record could not be stored: {exc}")
            self.emit(Done(sid, rec.outcome, Summary.of(rec)))

    async def _deadline(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.record.errors.append(f"maximum session time of {seconds}s reached; the rest waits for the next "
                                  f"session")
        self.emit(Error(self.record.errors[-1]))
        self.halt("maximum session time reached")

    def _outcome(self) -> str:
        rec = self.record
        if self.interrupted_by is not None:
            return "interrupted"
        if rec.connected_at is None:
            return "failed"
        if rec.carrier_lost or rec.errors:
            return "partial"
        return "ok"

    async def _online(self) -> None:
        rec = self.record
        self.phase = "dialing"
        try:
            async with link.up(self.config, self._link_event) as info:
                self.phase = {"both": "sending and fetching", "send": "sending",
                              "fetch": "fetching"}[rec.mode]
                rec.connected_at = self.clock()
                online_since = uptime()
                rec.connect_rate = info.rate
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
                    rec.online_seconds = uptime() - online_since
                    self.phase = "hanging up"
        except LinkError as exc:
            rec.errors.append(str(exc))
            self.emit(Error(str(exc)))

    def _link_event(self, event: Event) -> None:
        if isinstance(event, ModemLine) and _is_dial_result(event.text):
            self.record.dial_attempts.append(event.text)
        self.emit(event)

    async def _watch(self, info) -> None:
        """Stop both sides on carrier loss or when nothing moved for idle_timeout."""
        idle = self.config.session.idle_timeout
        last_bytes = None
        while not self.stop.is_set():
            if info.carrier_lost.is_set():
                self.record.carrier_lost = True
                reason = info.loss_reason or "carrier lost"
                self.record.errors.append(f"carrier lost: {reason}")
                self.line_gone.set()
                self.halt(f"carrier lost: {reason}")
                return
            counters = (info.bytes_up, info.bytes_down)
            if counters != last_bytes:
                last_bytes = counters
                self.last_activity = time.monotonic()
            if idle and time.monotonic() - self.last_activity > idle:
                self.record.errors.append(f"nothing moved for {idle}s; hung up")
                self.line_gone.set()
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
        if self.etrn_asked is not None:
            jobs.append(self._await_released_mail())
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                msg = f"{type(res).__name__}: {res}"
                self.record.errors.append(msg)
                self.emit(Error(msg))
        # When the line dropped, whatever the two sides report is secondary.
        if info.carrier_lost.is_set() and not self.record.carrier_lost:
            self.record.carrier_lost = True
            self.record.errors.append(f"carrier lost: {info.loss_reason}")

    async def _send(self) -> None:
        from gateway.relay import flush as relay
        spool = self.ctx.spool
        # A session someone asked for, or the retry after a dropped line, sends everything
        # waiting (as postqueue -f does); scheduled and demand sessions respect back-off.
        force = self.record.trigger in ("manual", "retry", "flush")
        result = relay.FlushResult()
        try:
            await relay.flush(self.config, spool.queue, clock=self.clock, progress=self._send_progress,
                              stop_event=self.line_gone, finish_event=self.stop, force=force,
                              on_local_mail=self.ctx.kick_delivery, result=result)
        finally:  # also when the session is cut off: what was sent is counted
            self.record.sent += result.sent
            self.record.deferred += result.deferred
            self.record.bounced += result.bounced
        why = None
        if result.error is not None:
            why = f"send: {result.error.reply}"
            self.record.errors.append(why)
        # The reason goes with the counts: "7 deferred" alone leaves the admin guessing.
        self.emit(SendDone(result.sent, result.deferred, result.bounced, result.bytes, why))

    def _send_progress(self, p) -> None:  # gateway.relay.SendProgress
        self.emit(Sent(p.qid, p.size, p.total, round(p.seconds, 2), done=p.messages, left=p.remaining))

    async def _fetch(self) -> None:
        from gateway.fetch import imap as fetch
        spool = self.ctx.spool
        self._fetched_so_far = [0, 0]
        try:
            result = await fetch.fetch_all(self.config, spool.queue, spool.catalogue, spool.directory,
                                           clock=self.clock, progress=self._fetch_progress, stop_event=self.stop)
        except asyncio.CancelledError:  # cut off: count what the progress reports showed spooled
            self.record.fetched += self._fetched_so_far[0]
            self.record.fetched_bytes += self._fetched_so_far[1]
            raise
        self.record.fetched += result.fetched
        self.record.fetched_bytes += getattr(result, "bytes", 0)
        self.record.fetch_wire_down += getattr(result, "wire_down", 0)
        self.record.fetch_wire_up += getattr(result, "wire_up", 0)
        whys = [f"fetch: {err}" for err in getattr(result, "errors", []) or []]
        self.record.errors.extend(whys)
        if result.fetched and self.ctx.kick_delivery:
            self.ctx.kick_delivery()
        self.emit(FetchDone(result.fetched, tuple(whys)))

    def _fetch_progress(self, p) -> None:  # gateway.fetch.FetchProgress
        if p.partial:
            self.emit(FetchedPiece(p.uid, p.size, p.done_bytes))
            return
        self._fetched_so_far[0] += 1
        self._fetched_so_far[1] += p.size
        self.emit(Fetched(f"{p.account}/{p.folder}/{p.uid}", p.size, p.bytes, done=p.messages,
                          left=max(0, p.planned_messages - p.messages)))

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
                    self.emit(Etrn(domain, resp.code, resp.message))
                    inbound = self.ctx.inbound
                    if resp.code // 100 == 2 and inbound is not None and self.etrn_asked is None:
                        self.etrn_asked = (time.monotonic(), inbound.accepted())
        except Exception as exc:
            self.emit(EtrnFailed(str(exc)))

    async def _await_released_mail(self) -> None:
        """Keep the line up for the mail ETRN released, alongside the relay and the fetch.

        The ISP delivers it to our SMTP listener on its own schedule, and its 250 does
        not say whether it holds anything (Postfix answers "Queuing started" either way).
        So: wait up to ``etrn_wait`` after the ETRN for a first connection; once the ISP
        delivers, wait until no SMTP connection has been open for ETRN_QUIET seconds.
        Hanging up earlier would leave the mail at the ISP until the next session.
        """
        inbound = self.ctx.inbound
        asked, before = self.etrn_asked
        seen = False
        quiet_since = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if inbound.connections() or inbound.accepted() > before:
                seen = True
            if inbound.connections():
                quiet_since = now
            if seen and now - quiet_since >= ETRN_QUIET:
                break
            if not seen and now - asked >= self.config.session.etrn_wait:
                break
            try:
                await asyncio.wait_for(self.stop.wait(), 0.1)
            except TimeoutError:
                pass
        arrived = inbound.accepted() - before
        self.record.etrn_received = arrived
        self.emit(Info(f"{arrived} message(s) arrived after ETRN"))

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
        self.emit(Hook(which, command, proc.returncode, out.decode(errors="replace")[-500:]))
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
        while rec.outcome == "partial" and rec.carrier_lost and tries < cfg.retry_count \
                and control.interrupted_by is None:
            tries += 1
            if emit:
                emit(Retry(cfg.retry_delay, tries, cfg.retry_count))
            if not await control.pause(cfg.retry_delay, sleep):
                if emit:
                    emit(Info(f"no further try: interrupted by {control.interrupted_by}"))
                break
            rec = await control.run(Session(ctx, "retry", mode, emit))
        return rec
    finally:
        control.active = False
