"""Stage 6 by LMTP: one recipient's copies handed to an LMTP server (Dovecot) instead of
written into the spool's Maildirs (``[delivery] lmtp``).

One LMTP transaction per queued recipient, with a RCPT for each of its mailboxes, so each
mailbox gets its own reply after the final dot (RFC 2033) and each reply becomes an
``Outcome`` as the relay's SMTP replies do (gateway.mail.outcome): 2xx delivered, 4xx and
a lost connection deferred, 5xx bounced.

Exactly once, also across a kill -9 of either side:
* each mailbox is marked "sending" before the message goes and "taken" at its 2xx
  (spool.policystate ``handed_over``), before the recipient is recorded, so a retry
  skips what was taken;
* what is left is a copy still marked "sending": the server may have stored it and its
  reply was lost (dialmail killed, Dovecot killed between storing and answering, the
  connection cut after the final dot).  LMTP, like SMTP, cannot say.  Each copy carries
  ``X-Dialmail-Delivery:``, a name fixed per (message, recipient), so:
  - with ``[delivery] doveadm`` (Dovecot on this machine, or reachable by doveadm),
    dialmail asks before sending again: ``doveadm search`` for that name in every
    folder of the mailbox.  Stored means taken; not stored means send; no answer means
    wait and ask again.  This is exact.
  - the Sieve script ``etc/dialmail-dedupe.sieve``, run before every user's own
    (Dovecot's ``sieve_before``), discards a copy whose name the mailbox has seen.  It
    works where doveadm cannot reach (a cluster behind a proxy), but Dovecot records the
    name just after storing the mail, so a Dovecot killed in between still lets one
    duplicate through.
"""
from __future__ import annotations

import hashlib
import smtplib
import subprocess
from email.message import Message as EmailHeaders

from gateway.config import LMTPTarget
from gateway.mail import outcome
from gateway.mail.outcome import Outcome
from spool.queue import Message, Queue

DELIVERY_HEADER = "X-Dialmail-Delivery"
READ = 256 * 1024


def delivery_name(msg: Message, rcpt: str) -> str:
    """The name every copy of ``msg`` for ``rcpt`` carries, the same at each try."""
    return f"{msg.id}.{hashlib.sha1(rcpt.encode()).hexdigest()[:10]}"


def prologue(msg: Message, rcpt: str, headers: EmailHeaders | None) -> bytes:
    """Lines put before the message.  The LMTP server writes Return-Path and Received
    itself; Delivered-To keeps the address the mail was sent to (an alias, a group)."""
    lines = [f"{DELIVERY_HEADER}: {delivery_name(msg, rcpt)}"]
    if headers is None or rcpt.lower() not in (str(v).strip().lower() for v in headers.get_all("Delivered-To", [])):
        lines.append(f"Delivered-To: {rcpt}")
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "surrogateescape")


def hand_over(target: LMTPTarget, timeout: float, helo: str, queue: Queue, msg: Message, rcpt: str,
              mailboxes: list[str], headers: EmailHeaders | None = None) -> dict[str, Outcome]:
    """Deliver ``msg`` (for ``rcpt``) into ``mailboxes`` through the LMTP server; one
    outcome per mailbox.  Blocking: run it on a worker thread."""
    where = f"LMTP {target}"
    try:
        client = smtplib.LMTP(timeout=timeout)
        code, text = client.connect(str(target.socket)) if target.socket is not None else \
            client.connect(target.host, target.port)
    except (OSError, smtplib.SMTPException) as exc:
        why = outcome.cannot_connect(f"{where}: {getattr(exc, 'strerror', None) or exc}")
        return {box: why for box in mailboxes}
    try:
        return _transaction(client, code, text, helo, queue, msg, rcpt, mailboxes, headers, where)
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()


def _transaction(client: smtplib.LMTP, code: int, text: bytes, helo: str, queue: Queue, msg: Message, rcpt: str,
                 mailboxes: list[str], headers: EmailHeaders | None, where: str) -> dict[str, Outcome]:
    results: dict[str, Outcome] = {}
    step = "at the greeting"
    try:
        if code != 220:
            return _all(mailboxes, _refused(code, text, where, step))
        step = "after LHLO"
        code, text = client.ehlo(helo)
        if code != 250:
            return _all(mailboxes, _refused(code, text, where, step))
        step = "after MAIL FROM"
        code, text = client.docmd("MAIL", f"FROM:<{msg.sender}>")
        if code != 250:
            return _all(mailboxes, _refused(code, text, where, step))
        accepted = []
        for box in mailboxes:
            step = f"after RCPT TO:<{box}>"
            code, text = client.docmd("RCPT", f"TO:<{box}>")
            if code in (250, 251):
                accepted.append(box)
            else:
                results[box] = _refused(code, text, where, step)
        if not accepted:
            client.rset()
            return results
        step = "after DATA"
        code, text = client.docmd("DATA")
        if code != 354:
            results.update(_all(accepted, _refused(code, text, where, step)))
            return results
        step = "while sending the message"
        _send_body(client, queue, msg, prologue(msg, rcpt, headers))
        # RFC 2033: one reply per accepted RCPT, in their order, after the final dot.
        for box in accepted:
            step = f"after the final dot, waiting for <{box}>'s reply"
            code, text = client.getreply()
            results[box] = _refused(code, text, where, step) if code // 100 != 2 else \
                outcome.from_reply(code, text.decode("utf-8", "replace"))
        return results
    except smtplib.SMTPServerDisconnected:
        lost = outcome.lost_connection(f"{where} {step}")
    except TimeoutError:
        lost = outcome.timed_out(f"{step} at {where}")
    except OSError as exc:  # smtplib's errors too, e.g. a reply line it will not read (too long)
        lost = outcome.lost_connection(f"{where} {step} ({exc.strerror or exc})")
    return {box: results.get(box, lost) for box in mailboxes}


def stored(doveadm: tuple[str, ...], mailbox: str, name: str, timeout: float = 60) -> bool | None:
    """Whether ``mailbox`` holds a copy named ``name`` in any folder (Sieve may have filed
    it anywhere), by ``doveadm search``; None when doveadm could not tell."""
    try:
        found = subprocess.run([*doveadm, "search", "-u", mailbox, "mailbox", "*", "header", DELIVERY_HEADER, name],
                               capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if found.returncode != 0:
        return None
    return bool(found.stdout.strip())


def _send_body(client: smtplib.LMTP, queue: Queue, msg: Message, first: bytes) -> None:
    """The message, dot-stuffed line by line as it is read, then the final dot: never whole in memory."""
    pending = bytearray(first)
    at_line_start = True
    with queue.open_body(msg.id) as body:
        while True:
            line = body.readline(READ)
            if not line:
                break
            if at_line_start and line[:1] == b".":
                pending += b"."
            pending += line
            at_line_start = line.endswith(b"\n")
            if len(pending) >= READ:
                client.send(bytes(pending))
                pending.clear()
    if not at_line_start:
        pending += b"\r\n"
    pending += b".\r\n"
    client.send(bytes(pending))


def _refused(code: int, text: bytes, where: str, step: str) -> Outcome:
    said = " ".join(text.decode("utf-8", "replace").split())
    o = outcome.from_reply(code, said)
    return Outcome(o.status, o.code, o.dsn, f"{where} said {step}: {code} {said}")


def _all(mailboxes: list[str], o: Outcome) -> dict[str, Outcome]:
    return {box: o for box in mailboxes}


def probe(target: LMTPTarget, timeout: float = 5.0) -> str | None:
    """Why the LMTP server cannot take mail now (for ``dialmail check``), or None: it
    greeted and answered LHLO."""
    try:
        client = smtplib.LMTP(timeout=timeout)
        code, text = client.connect(str(target.socket)) if target.socket is not None else \
            client.connect(target.host, target.port)
    except (OSError, smtplib.SMTPException) as exc:
        return f"cannot connect to the LMTP server {target}: {getattr(exc, 'strerror', None) or exc}"
    try:
        if code != 220:
            return f"the LMTP server {target} greeted with {code} {text.decode('utf-8', 'replace')}"
        code, text = client.ehlo("dialmail-check")
        if code != 250:
            return f"the LMTP server {target} answered LHLO with {code} {text.decode('utf-8', 'replace')}"
        return None
    except (OSError, smtplib.SMTPException) as exc:
        return f"the LMTP server {target} went away during LHLO: {exc}"
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()
