"""The daemon's control socket: ``connect-now``, ``hangup`` and ``status`` from the command line.

A unix socket ``<spool>/control.sock`` (mode 0600: only the spool's owner may talk to
it).  One JSON object per line.  Requests:

    {"cmd": "status"}                         -> one status object
    {"cmd": "connect", "mode": "both"}        -> the session's events, one per line,
                                                 ending with {"type": "end", ...}
    {"cmd": "hangup"}                         -> {"type": "hangup-asked", ...} and the
                                                 session's events to its "end", or
                                                 {"type": "no-session", ...}

A connect while a session runs follows that session instead of starting another.

Both ends speak in the session's event values (``gateway.session.events``) and the
replies below; ``to_json`` and ``from_json`` are the only places that know the JSON, so
the daemon's events reach connect-now and the demo as the same objects a session run in
the process emits.  The keys on the wire stay as they are: an older daemon and a newer
command line still understand each other, and a kind one side does not know is skipped.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import keyword
import logging
import os
import typing
from pathlib import Path
from typing import AsyncIterator

from gateway.session import events
from gateway.session.events import End, Error, Event, Info
from gateway.session.runner import SessionRunner

log = logging.getLogger("dialmail.control")


@dataclasses.dataclass(frozen=True)
class Status(Event):
    """The daemon's answer to ``status``."""
    kind = "status"
    pid: int
    link: str  # idle | dialing | connected at N bps
    session: dict | None  # the running session: trigger, mode, started
    queue: dict  # spool.queue.Queue.counts()
    next_dial: str | None
    last_session: dict | None


@dataclasses.dataclass(frozen=True)
class HangupAsked(Event):
    kind = "hangup-asked"
    session: dict | None


@dataclasses.dataclass(frozen=True)
class NoSession(Event):
    kind = "no-session"
    message: str


_KINDS: dict[str, type[Event]] = {
    cls.kind: cls for cls in (
        events.Started, events.Refused, events.Stopping, events.Error, events.Info, events.Hook, events.Dialing,
        events.ModemLine, events.Connected, events.Hangup, events.HungUp, events.Etrn, events.Sent,
        events.Fetched, events.FetchedPiece, events.SendDone, events.FetchDone, events.Retry, events.Done,
        events.End, Status, HangupAsked, NoSession)
}


def to_json(event: Event) -> bytes:
    """One line on the socket: ``{"type": kind, field: value, ...}`` in the fields' order."""
    obj: dict[str, object] = {"type": event.kind}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        obj[_key(f.name)] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return json.dumps(obj, default=str).encode() + b"\n"


def from_json(line: bytes) -> Event | None:
    """The event on one line, or None for a kind this side does not know (a newer daemon's)."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError(f"not an event: {line[:80]!r}")
    kind = data.get("type")
    # ETRN reports either the server's answer or why it could not be asked: two values, one kind.
    cls = events.EtrnFailed if kind == "etrn" and "error" in data else _KINDS.get(kind)
    if cls is None:
        return None
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if _key(f.name) in data:
            values[f.name] = _typed(hints[f.name], data[_key(f.name)])
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"malformed {kind!r} event: {exc}") from None


def _key(name: str) -> str:
    # A field named after a Python keyword carries a trailing underscore ("in_"); the wire has none.
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def _typed(hint: object, value: object) -> object:
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(hint)}
        return hint(**{k: _typed(None, v) for k, v in value.items() if k in known})
    return tuple(value) if isinstance(value, list) else value

def socket_path(spool_dir: Path) -> Path:
    return Path(spool_dir) / "control.sock"


async def service(daemon):
    """Daemon service: the control socket."""
    runner = getattr(daemon, "sessions", None)
    if runner is None:
        runner = daemon.sessions = SessionRunner(daemon)
    path = socket_path(daemon.config.spool_dir)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(lambda r, w: _client(daemon, runner, r, w), path=str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    log.info("control socket %s", path)

    async def stop():
        server.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        await runner.stop(daemon.stop_reason or "the daemon stopping")

    return stop


async def _client(daemon, runner: SessionRunner, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
        try:
            req = json.loads(line or b"{}")
        except ValueError:
            req = {}
        cmd = req.get("cmd")
        if cmd == "status":
            await _send(writer, await status(daemon, runner))
        elif cmd == "hangup":
            await _hangup(runner, writer)
        elif cmd == "connect":
            mode = req.get("mode", "both")
            if mode not in ("both", "send", "fetch"):
                await _send(writer, Error(f"unknown mode {mode!r}"))
                return
            q = runner.subscribe()
            try:
                started = runner.start("manual", mode)
                if not started:
                    await _send(writer, Info("a session is already running; following it"))
                while True:
                    event = await q.get()
                    await _send(writer, event)
                    if isinstance(event, End):
                        break
            finally:
                runner.unsubscribe(q)
        else:
            await _send(writer, Error(f"unknown command {cmd!r}"))
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def _hangup(runner: SessionRunner, writer: asyncio.StreamWriter) -> None:
    q = runner.subscribe()
    try:
        if not runner.hangup("dialmail hangup"):
            await _send(writer, NoSession("no dial session is running"))
            return
        await _send(writer, HangupAsked(runner.current))
        while True:  # follow to the end, so the caller knows when the line is down
            event = await q.get()
            await _send(writer, event)
            if isinstance(event, End):
                break
    finally:
        runner.unsubscribe(q)


async def _send(writer: asyncio.StreamWriter, event: Event) -> None:
    writer.write(to_json(event))
    await writer.drain()


async def status(daemon, runner: SessionRunner) -> Status:
    from spool.sessions import SessionLog
    spool = daemon.spool
    counts = await asyncio.to_thread(spool.queue.counts)
    last = await asyncio.to_thread(lambda: SessionLog(spool.catalogue).last(1))
    sched = getattr(daemon, "scheduler", None)
    next_dial = sched.next_dial() if sched is not None else None
    return Status(os.getpid(), runner.state, runner.current, counts,
                  next_dial.isoformat(sep=" ", timespec="minutes") if next_dial else None, _last(last))


def _last(rows) -> dict | None:
    if not rows:
        return None
    sid, rec = rows[-1]
    return {"id": sid, "started": rec.started, "trigger": rec.trigger, "outcome": rec.outcome,
            "sent": rec.sent, "fetched": rec.fetched, "connected_seconds": round(rec.connected_seconds, 1),
            "fetched_bytes": rec.fetched_bytes, "fetch_wire_down": rec.fetch_wire_down, "errors": rec.errors}


# ---------------------------------------------------------------- client side


class NoDaemon(Exception):
    pass


async def request(spool_dir: Path, obj: dict) -> AsyncIterator[Event]:
    """Send one request to the daemon and give back what it answers, event by event."""
    path = socket_path(spool_dir)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise NoDaemon(str(exc)) from None
    try:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                return
            event = from_json(line)
            if event is not None:
                yield event
    finally:
        writer.close()

