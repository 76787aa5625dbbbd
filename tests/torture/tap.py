"""A transparent TCP relay that keeps every byte it passed, each way, per connection.

It sits between the line shaper and a peer (smtp-sink, Dovecot): what it forwarded
upstream is what the peer got, so after a carrier drop it can say where in the
conversation the line went: for SMTP whether the final "." of a DATA had reached the
smarthost with no later command from our side (the RFC 1047 window), for IMAP which
command was in flight.  It runs its own event loop in a thread so it serves the test's
in-process sessions and a daemon subprocess alike.
"""
from __future__ import annotations

import asyncio
import re
import socket
import struct
import threading
from dataclasses import dataclass, field


@dataclass
class Conversation:
    up: bytearray = field(default_factory=bytearray)
    down: bytearray = field(default_factory=bytearray)
    closed_by: str = ""          # "client" (EOF from our side), "reset" (cut), "peer"
    done: bool = False


class Tap:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.conversations: list[Conversation] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._trigger: tuple[bytes, int, object] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"tap->{target_port}")

    def start(self) -> "Tap":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()
        server.close()

    def arm(self, pattern: bytes, nth: int, action) -> None:
        """Call ``action()`` (on the tap's thread) right after the ``nth`` occurrence of
        ``pattern`` in our side's bytes has been passed on to the peer: e.g. cut the line
        while the ISP's answer to that command is on its way back."""
        with self.lock:
            self._trigger = (pattern, nth, action)

    def disarm(self) -> None:
        with self.lock:
            self._trigger = None

    def _check_trigger(self, buf: bytearray, added: int) -> None:
        with self.lock:
            if self._trigger is None:
                return
            pattern, nth, action = self._trigger
            new = buf.count(pattern) - buf[:max(0, len(buf) - added)].count(pattern)
            if new <= 0:
                return
            if nth > new:
                self._trigger = (pattern, nth - new, action)
                return
            self._trigger = None
        action()

    def snapshot(self) -> list[Conversation]:
        with self.lock:
            return [Conversation(bytearray(c.up), bytearray(c.down), c.closed_by, c.done)
                    for c in self.conversations]

    def idle(self) -> bool:
        with self.lock:
            return all(c.done for c in self.conversations)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        conv = Conversation()
        with self.lock:
            self.conversations.append(conv)
        try:
            tr, tw = await asyncio.open_connection(*self.target)
        except OSError:
            conv.closed_by, conv.done = "peer", True
            _reset(cw)
            return

        async def pump(reader, writer, buf, side):
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        return side, "eof"
                    writer.write(data)
                    with self.lock:
                        buf.extend(data)
                    await writer.drain()
                    if side == "client":
                        self._check_trigger(buf, len(data))
            except (ConnectionError, OSError):
                return side, "reset"

        up = asyncio.ensure_future(pump(cr, tw, conv.up, "client"))
        down = asyncio.ensure_future(pump(tr, cw, conv.down, "peer"))
        finished, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        side, how = finished.pop().result()
        if how == "reset":
            # The line was cut: the peer gets a reset too, as the ISP's end would see it.
            conv.closed_by = "reset"
            _reset(tw)
            _reset(cw)
        else:
            conv.closed_by = side
            if side == "client":
                # Our side closed: let the peer's last words (221) through, then close.
                try:
                    tw.write_eof()
                    await asyncio.wait_for(down, 5)
                except Exception:
                    pass
            for w in (tw, cw):
                if not w.is_closing():
                    w.close()
        for t in pending:
            t.cancel()
        conv.done = True


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


# ----------------------------------------------------------------- where did a cut happen

MSGID = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.I | re.M)


@dataclass
class SmtpCut:
    phase: str                   # "before-data", "data", "window", "after-reply", "clean"
    message_id: str | None = None


def smtp_cut(conv: Conversation) -> SmtpCut:
    """Where an SMTP conversation stood when it ended.

    "window": the final "." of a message had been passed to the smarthost and our side
    had sent nothing after it: the smarthost may have taken the message while its reply
    never reached us (RFC 1047); a duplicate of exactly that message is then expected.
    """
    up = bytes(conv.up)
    # A daemon killed with -9 closes with FIN or RST as the kernel pleases: a conversation
    # that did not end with our QUIT was cut, whichever way it ended.
    if re.search(rb"(?im)^QUIT\r\n\Z", up):
        return SmtpCut("clean")
    pos, state, mid = 0, "before-data", None
    while True:
        m = re.compile(rb"(?im)^DATA\r\n").search(up, pos)
        if not m:
            break
        end = up.find(b"\r\n.\r\n", m.end() - 2)
        found = MSGID.search(up, m.end(), end if end >= 0 else len(up))
        mid = found.group(1).decode() if found else None
        if end < 0:
            return SmtpCut("data", mid)
        pos = end + 5
        state = "window" if pos == len(up) else "after-reply"
    return SmtpCut(state, mid if state == "window" else None)


IMAP_CMD = re.compile(rb"^(\S+) ((?:UID )?[A-Z]+)", re.M)


def imap_cut(conv: Conversation) -> str:
    """The IMAP command in flight when the line went; "<command> answered" when the ISP had
    sent its tagged reply (which may still have been on the line) and nothing followed."""
    up, down = bytes(conv.up), bytes(conv.down)
    if re.search(rb"(?im)^\S+ LOGOUT\r\n\Z", up):
        return "clean"
    last = None
    for m in IMAP_CMD.finditer(up):
        if m.group(1) != b"*" and not m.group(1).isdigit():
            last = m
    if last is None:
        return "login"
    tag, cmd = last.group(1), last.group(2).decode().upper()
    if re.search(rb"(?m)^" + re.escape(tag) + rb" (OK|NO|BAD)", down):
        return f"{cmd.lower()} answered"
    return cmd.lower()
