"""``dialmail sendmail``: the sendmail command line that scripts and cron expect.

Supported: ``-t`` (recipients from To/Cc/Bcc, Bcc removed), ``-i``/``-oi`` (a lone dot
does not end the message), ``-f sender`` / ``-fsender``, ``-F name``, ``-v``; other
``-o``/``-b``/``-B`` options that sendmail accepts are ignored as Postfix does.
The message is queued directly in the spool; local recipients are delivered at once.
"""
from __future__ import annotations

import email.utils
import getpass
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import BinaryIO

import typer

from gateway.cli.app import EX_USAGE, app, explained, fail, state
from gateway.config import Config
from gateway.delivery.worker import LocalDelivery
from gateway.mail import address
from gateway.mail import headers as mail_headers
from gateway.mail.errors import PermanentError, TransientError
from gateway.office.directory import Directory
from spool.fsio import is_disk_full
from spool.queue import LOCAL, RELAY, Catalogue, Queue
from spool.users import Users


@dataclass
class Options:
    recipients: list[str] = field(default_factory=list)
    from_headers: bool = False
    ignore_dots: bool = False
    sender: str | None = None
    full_name: str | None = None
    verbose: bool = False
    help: bool = False


USAGE = """\
usage: sendmail [-t] [-i] [-f sender] [-F name] [-v] [rcpt ...]
Queue the message read from standard input for the recipients (dialmail's sendmail).
  -t         take recipients from the To:, Cc: and Bcc: headers too (Bcc: is removed)
  -i         a line with a lone dot does not end the message (also -oi)
  -f sender  the envelope sender (also -fsender, -r sender); default: your login name
             at the first local domain
  -F name    the full name for a From: header that dialmail adds
  -v         print the queue id of the message
  rcpt       recipient addresses
Other sendmail options (-o..., -B..., -N ..., -h N, ...) are accepted and ignored.
Exit codes: 0 queued, 64 usage error, 69 permanent failure, 75 try again, 78 bad configuration.
"""


def parse_args(args: list[str]) -> Options:
    opts = Options()
    it = iter(args)
    for arg in it:
        if arg == "--":
            opts.recipients.extend(it)
            break
        if arg == "--help":
            opts.help = True
        elif not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
        elif arg == "-t":
            opts.from_headers = True
        elif arg in ("-i", "-oi"):
            opts.ignore_dots = True
        elif arg == "-v":
            opts.verbose = True
        elif arg.startswith("-f") or arg.startswith("-r"):
            opts.sender = arg[2:] or next(it, None)
            if opts.sender is None:
                raise ValueError(f"{arg} needs a sender address")
        elif arg.startswith("-F"):
            opts.full_name = arg[2:] or next(it, None)
        elif arg[:2] in ("-o", "-b", "-B", "-N", "-R", "-V", "-X", "-O", "-q", "-h", "-C", "-L"):
            if arg in ("-bp", "-bs", "-bd", "-bi"):
                raise ValueError(f"{arg} is not supported; use 'dialmail queue list' or 'dialmail run'")
            if arg in ("-N", "-R", "-V", "-X", "-O", "-C", "-L", "-h", "-B"):
                next(it, None)
        else:
            raise ValueError(f"unknown option {arg}")
    return opts


def _read(stream: BinaryIO, ignore_dots: bool) -> bytes:
    lines = []
    for line in stream:
        if not ignore_dots and line.rstrip(b"\r\n") == b".":
            break
        lines.append(line.rstrip(b"\r\n") + b"\r\n")
    return b"".join(lines)


_FIELD_NAME = re.compile(rb"[!-9;-~]+[ \t]*:")  # RFC 5322 ftext, then the colon


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block ending in CRLF, body) as Postfix's sendmail reads its input: the
    headers end at the first empty line, or at the first line that is neither a header
    nor a continuation -- that line starts the body (``echo "disk full" | sendmail root``)."""
    pos = 0
    in_header = False
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        end = len(data) if end < 0 else end
        line = data[pos:end]
        if line == b"":
            return data[:pos], data[end + 2:]
        if line[:1] in (b" ", b"\t") and in_header:
            pass
        elif _FIELD_NAME.match(line):
            in_header = True
        else:
            return data[:pos], data[pos:]
        pos = end + 2
    return data, b""


def qualify(addr: str, domain: str) -> str:
    """A bare name becomes name@<first local domain>, as Postfix's append_at_myorigin does."""
    addr = address.normalise(addr)
    return f"{addr}@{domain}" if addr and "@" not in addr else addr


def submit(config: Config, opts: Options, stream: BinaryIO, login: str) -> str:
    data = _read(stream, opts.ignore_dots)
    if data.startswith(b"From "):  # an mbox separator line, as mail(1) and some scripts write
        data = data.split(b"\r\n", 1)[1] if b"\r\n" in data else b""
    head, body = split_message(data)
    headers = mail_headers.parse(head)
    domain = config.server.domains[0]
    sender = opts.sender if opts.sender is not None else login
    sender = qualify(sender, domain) if sender else ""
    rcpts = [qualify(r, domain) for r in opts.recipients]
    if opts.from_headers:
        for name in ("To", "Cc", "Bcc"):
            rcpts.extend(qualify(a, domain) for _, a in email.utils.getaddresses(headers.get_all(name, []))
                         if a)
        head = b"".join(line + b"\r\n" for line in _drop_header(head, b"bcc"))
    rcpts = list(dict.fromkeys(r for r in rcpts if r))
    if not rcpts:
        raise PermanentError("no recipients given (name them or use -t)")
    added = []
    if headers.get("From") is None:
        name = f"{opts.full_name} " if opts.full_name else ""
        added.append(f"From: {name}<{sender}>" if name else f"From: {sender}")
    if headers.get("Date") is None:
        added.append(f"Date: {email.utils.formatdate(localtime=True)}")
    if headers.get("Message-ID") is None:
        added.append(f"Message-ID: {email.utils.make_msgid(domain=config.server.hostname)}")
    received = (f"Received: by {config.server.hostname} (dialmail sendmail, from userid {login});\r\n"
                f"\t{email.utils.formatdate(time.time(), localtime=True)}\r\n")
    # the header block always ends with an empty line, also when the input had none
    message = received.encode() + head + "".join(h + "\r\n" for h in added).encode() + b"\r\n" + body
    cat = Catalogue(config.spool_dir)
    try:
        queue = Queue(cat)
        directory = Directory(config, Users(config.spool_dir))
        routes = []
        for r in rcpts:
            if directory.is_local(r):
                if not directory.exists(r):
                    raise PermanentError(f"{r}: no such user here")
                routes.append((r, LOCAL))
            else:
                routes.append((r, RELAY))
        try:
            qid = queue.enqueue(sender, routes, message, origin="sendmail", client=login,
                                message_id=headers.get("Message-ID"), subject=headers.get("Subject"))
        except OSError as exc:
            raise TransientError(f"cannot write to the spool: {'disk full' if is_disk_full(exc) else exc}") \
                from None
        if any(route == LOCAL for _, route in routes):
            LocalDelivery(config, queue, directory).run_once()
        return qid
    finally:
        cat.close()


def _drop_header(head: bytes, name: bytes):
    """Lines of ``head`` without header ``name`` (and its continuation lines)."""
    skipping = False
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                yield line
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == name
        if not skipping:
            yield line


__all__ = ["USAGE", "Options", "parse_args", "submit", "sendmail"]


# ---------------------------------------------------------------- the command


# sendmail's own options (-t, -i, -f ...) are not click options: they reach parse_args as they
# came, and so does --help, which prints sendmail's usage rather than click's.
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
@explained
def sendmail(ctx: typer.Context):
    """sendmail-compatible: queue a message read from stdin (options: dialmail sendmail --help)."""
    from gateway.cli.sendmail import USAGE, parse_args, submit
    try:
        opts = parse_args(ctx.args)
    except ValueError as exc:
        fail(f"sendmail: {exc} (sendmail --help lists the options)", EX_USAGE)
    if opts.help:
        typer.echo(USAGE, nl=False)
        return
    cfg = state(ctx).config()
    qid = submit(cfg, opts, sys.stdin.buffer, login=_login_name())
    if opts.verbose:
        typer.echo(f"queued as {qid}")


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())
