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
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import AsyncIterator

from gateway.session.runner import SessionRunner

log = logging.getLogger("dialmail.control")

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
                await _send(writer, {"type": "error", "message": f"unknown mode {mode!r}"})
                return
            q = runner.subscribe()
            try:
                started = runner.start("manual", mode)
                if not started:
                    await _send(writer, {"type": "info", "message": "a session is already running; following it"})
                while True:
                    event = await q.get()
                    await _send(writer, event)
                    if event.get("type") == "end":
                        break
            finally:
                runner.unsubscribe(q)
        else:
            await _send(writer, {"type": "error", "message": f"unknown command {cmd!r}"})
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
            await _send(writer, {"type": "no-session", "message": "no dial session is running"})
            return
        await _send(writer, {"type": "hangup-asked", "session": runner.current})
        while True:  # follow to the end, so the caller knows when the line is down
            event = await q.get()
            await _send(writer, event)
            if event.get("type") == "end":
                break
    finally:
        runner.unsubscribe(q)


async def _send(writer: asyncio.StreamWriter, obj: dict) -> None:
    writer.write(json.dumps(obj, default=str).encode() + b"\n")
    await writer.drain()


async def status(daemon, runner: SessionRunner) -> dict:
    from spool.sessions import SessionLog
    spool = daemon.spool
    counts = await asyncio.to_thread(spool.queue.counts)
    last = await asyncio.to_thread(lambda: SessionLog(spool.catalogue).last(1))
    sched = getattr(daemon, "scheduler", None)
    next_dial = sched.next_dial() if sched is not None else None
    return {"type": "status", "pid": os.getpid(), "link": runner.state, "session": runner.current,
            "queue": counts, "next_dial": next_dial.isoformat(sep=" ", timespec="minutes") if next_dial else None,
            "last_session": _last(last)}


def _last(rows) -> dict | None:
    if not rows:
        return None
    sid, rec = rows[-1]
    return {"id": sid, "started": rec.started, "trigger": rec.trigger, "outcome": rec.outcome,
            "sent": rec.sent, "fetched": rec.fetched, "connected_seconds": round(rec.connected_seconds, 1),
            "errors": rec.errors}


# ---------------------------------------------------------------- client side


class NoDaemon(Exception):
    pass


async def request(spool_dir: Path, obj: dict) -> AsyncIterator[dict]:
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
            yield json.loads(line)
    finally:
        writer.close()

