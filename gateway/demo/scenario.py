"""``dialmail demo``: the whole system on a simulated modem and a simulated ISP.

In a temporary directory: a simulated ISP (smarthost + IMAP mailbox) reachable only
through the simulated modem's line shaper at 33.6 kbit/s; the real gateway daemon; LAN
users submitting mail by SMTP; mail waiting at the ISP; one dial session with live
progress; then every mailbox read back over POP3 (and over IMAP, through the Dovecot that
dialmail runs, when Dovecot is installed) and a table of where each message went.  Exit
code 0 only when every message arrived where it should.
"""
from __future__ import annotations

import asyncio
import email
import imaplib
import poplib
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from email.policy import default as default_policy
from pathlib import Path

import aiosmtplib
from rich.console import Console
from rich.table import Table

from gateway.demo.simisp import SimulatedISP, free_port
from gateway.imap.store import closed_above
from gateway.imap.supervisor import find_program

console = Console(highlight=False, width=118)
DOMAIN = "office.example"
USERS = {"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
CONSOLE_ADMIN = "alice"  # the demo's web console admin


@dataclass
class Expect:
    subject: str
    sender: str
    to: str
    where: str          # "mailbox:<user>" or "smarthost"
    how: str            # path description for the table
    arrived: str = "-"
    ok: bool = False


def _msg(sender: str, to: str, subject: str, body: str, extra: str = "") -> bytes:
    text = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{abs(hash((subject, time.time())))}@demo.{DOMAIN}>\r\n{extra}"
            f"Date: {email.utils.formatdate(localtime=True)}\r\n\r\n{body}\r\n")
    return text.encode()


def _config(tmp: Path, isp: SimulatedISP, smtp_port: int, pop3_port: int, relay_port: int, imap_port: int,
            rate: int, lan_imap_port: int | None, web_port: int) -> str:
    imap = f'\n[imap]\ndovecot = "managed"\nlisten = ["127.0.0.1:{lan_imap_port}"]\n' if lan_imap_port else ""
    return imap + textwrap.dedent(f"""\
        [server]
        hostname = "mail.{DOMAIN}"
        domains = ["{DOMAIN}"]
        spool_dir = "{tmp / 'spool'}"
        mynetworks = ["127.0.0.0/8"]

        [smtp]
        listen = ["127.0.0.1:{smtp_port}"]

        [pop3]
        listen = ["127.0.0.1:{pop3_port}"]

        [smarthost]
        host = "127.0.0.1"
        port = {relay_port}
        starttls = "off"

        [[fetch]]
        name = "isp"
        host = "127.0.0.1"
        port = {imap_port}
        tls = "off"
        username = "{isp.user}"
        password_file = "{tmp / 'isp.password'}"
        mode = "multidrop"
        envelope_header = "Delivered-To"
        keep = false

        [link]
        type = "sim"
        rate = {rate}
        dial_delay = "2s"
        busy = 1
        redial_delay = "1s"
        latency_ms = 75
        forward = ["127.0.0.1:{relay_port}->127.0.0.1:{isp.smtp_port}",
                   "127.0.0.1:{imap_port}->127.0.0.1:{isp.imap_port}"]

        [web]
        listen = ["127.0.0.1:{web_port}"]
        admins = ["{CONSOLE_ADMIN}"]

        [session]
        max_time = "5m"
        idle_timeout = "60s"
        cost_per_call = 0.10
        cost_per_minute = 0.03
        currency = "EUR"
        """)


async def run(tmp: Path, rate: int, stay: bool = False) -> int:
    """The demo; with ``stay``, the daemon, the simulated ISP and the web console keep running
    afterwards until Ctrl-C, so the console can be tried on what the demo did."""
    console.print(f"[bold]dialmail demo[/bold] in {tmp}")
    isp = SimulatedISP(tmp / "isp")
    daemon: subprocess.Popen | None = None
    try:
        await isp.start()
        console.print(f"simulated ISP: smarthost 127.0.0.1:{isp.smtp_port}, IMAP (pymap) 127.0.0.1:{isp.imap_port}; "
                      f"reachable only through the simulated modem at {rate} bit/s")
        smtp_port, pop3_port, relay_port, imap_port = free_port(), free_port(), free_port(), free_port()
        web_port = free_port()
        pw = tmp / "isp.password"
        pw.write_text(isp.password + "\n")
        pw.chmod(0o600)
        # IMAP is Dovecot on the same mailboxes, when it is installed: its processes must
        # pass through the demo's directory to the spool.
        no_imap = None if find_program("dovecot") else ("Dovecot is not installed.  To have IMAP on these "
                                                         "mailboxes: apt-get install dovecot-imapd, then add an "
                                                         "[imap] section (README: IMAP and bigger sites)")
        if no_imap is None and closed_above(tmp):
            no_imap = (f"Dovecot's processes cannot pass through {closed_above(tmp)} to the demo's directory "
                       f"(run the demo with TMPDIR set to a directory they can reach, such as /tmp)")
        lan_imap_port = free_port() if no_imap is None else None
        if lan_imap_port:
            tmp.chmod(0o711)
        cfg_path = tmp / "dialmail.toml"
        cfg_path.write_text(_config(tmp, isp, smtp_port, pop3_port, relay_port, imap_port, rate, lan_imap_port, web_port))

        def cli(*args, input=None):
            return subprocess.run([sys.executable, "-m", "gateway", "-c", str(cfg_path), *args], input=input,
                                  capture_output=True, timeout=120, check=False)

        for user, password in USERS.items():
            cli("users", "add", user, "--password-stdin", input=f"{password}\n".encode())
        log = open(tmp / "dialmail.log", "wb")
        daemon = subprocess.Popen([sys.executable, "-m", "gateway", "-c", str(cfg_path), "run"], stdout=log,
                                  stderr=log)
        log.close()
        expects: list[Expect] = []
        await _wait_port(smtp_port, daemon)
        console.print(f"gateway daemon running (pid {daemon.pid}): SMTP 127.0.0.1:{smtp_port}, "
                      f"POP3 127.0.0.1:{pop3_port}"
                      + (f", IMAP 127.0.0.1:{lan_imap_port} (Dovecot, run by dialmail)" if lan_imap_port else ""))
        console_url = (f"web console: http://127.0.0.1:{web_port}/  "
                       f"(log in as {CONSOLE_ADMIN}, password {USERS[CONSOLE_ADMIN]})")
        console.print(console_url)

        console.rule("LAN users send mail (the link is down)")
        lan = [
            ("alice", f"bob@{DOMAIN}", "Lunch on Friday?", "mailbox:bob", "LAN → mailbox"),
            ("bob", "orders@supplier.example", "Order 4711: 20 boxes of paper", "smarthost", "LAN → queue → ISP"),
            ("carol", "client@customer.example", "Quote attached", "smarthost", "LAN → queue → ISP"),
            ("alice", f"carol@{DOMAIN}", "Minutes of Monday's meeting", "mailbox:carol", "LAN → mailbox"),
        ]
        for user, to, subject, where, how in lan:
            sender = f"{user}@{DOMAIN}"
            body = f"Hello,\r\n\r\n{subject}.\r\n\r\n-- {user}" + ("\r\n" + "x" * 76) * (60 if where == "smarthost"
                                                                                        else 1)
            await aiosmtplib.send(_msg(sender, to, subject, body), sender=sender, recipients=[to],
                                  hostname="127.0.0.1", port=smtp_port)
            expects.append(Expect(subject, sender, to, where, how))
            console.print(f"  {sender} → {to}: “{subject}” accepted")
        queue = cli("queue", "list").stdout.decode()
        console.print(textwrap.indent(queue.rstrip(), "  "))

        console.rule("Meanwhile, mail for the office arrives at the ISP")
        inbound = [
            ("news@supplier.example", "alice", "Your order has shipped"),
            ("client@customer.example", "bob", "Re: Quote"),
            ("friend@elsewhere.example", "carol", "Weekend plans"),
        ]
        for sender, user, subject in inbound:
            to = f"{user}@{DOMAIN}"
            isp.deliver_to_mailbox(_msg(sender, to, subject, f"Hi {user},\r\n\r\n{subject}.",
                                        extra=f"Delivered-To: {to}\r\n"))
            expects.append(Expect(subject, sender, to, f"mailbox:{user}", "ISP → fetch → mailbox"))
            console.print(f"  {sender} → {to}: “{subject}” waiting in the ISP mailbox")

        console.rule("dialmail connect-now")
        from gateway.control import request
        from gateway.session.progress import ProgressView
        view = ProgressView(console)
        started = time.monotonic()
        async for event in request(tmp / "spool", {"cmd": "connect", "mode": "both"}):
            view(event)
        console.print(f"session finished in {time.monotonic() - started:.1f}s: {view.outcome}")

        console.rule("Mail clients collect their mail over POP3")
        got: dict[str, list[str]] = {}
        deadline = time.monotonic() + 30
        wanted = {e.where.split(":")[1] for e in expects if e.where.startswith("mailbox:")}
        while True:
            got = {u: _pop3_subjects(pop3_port, u, USERS[u]) for u in wanted}
            need = [e for e in expects if e.where.startswith("mailbox:") and e.subject not in
                    got.get(e.where.split(":")[1], [])]
            if not need or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        for user, subjects in sorted(got.items()):
            console.print(f"  {user}: {len(subjects)} message(s): " + "; ".join(f"“{s}”" for s in subjects))
        at_isp = [(env, email.message_from_bytes(data, policy=default_policy)) for env, data in isp.received()]
        for e in expects:
            if e.where == "smarthost":
                hits = [env for env, m in at_isp if m["Subject"] == e.subject and e.to in env["rcpt_tos"]]
                e.ok = len(hits) == 1
                e.arrived = f"ISP smarthost, {len(hits)}x" if hits else "not at the ISP"
            else:
                user = e.where.split(":")[1]
                n = got.get(user, []).count(e.subject)
                e.ok = n == 1
                e.arrived = f"{user} by POP3, {n}x" if n else "missing"
        left = isp.mailbox_count()

        if lan_imap_port:
            console.rule("The same mailboxes over IMAP (Dovecot, run by dialmail)")
            for user in sorted(wanted):
                folders, subjects = _imap_look(lan_imap_port, user, USERS[user])
                console.print(f"  {user}: folders {', '.join(folders)}; INBOX: "
                              + "; ".join(f"“{s}”" for s in subjects))
                for e in expects:
                    if e.where == f"mailbox:{user}" and e.ok:
                        e.ok = e.subject in subjects
                        e.arrived += ", IMAP" if e.ok else ", not in IMAP"
        else:
            console.rule("IMAP")
            console.print(f"  not shown: {no_imap}")

        console.rule("dialmail log")
        console.file.write(cli("log", "--last", "5").stdout.decode())
        table = Table(title="Where every message went")
        for col in ("subject", "from -> to", "path", "arrived", "ok"):
            table.add_column(col, no_wrap=col != "from -> to")
        for e in expects:
            table.add_row(e.subject, f"{e.sender} -> {e.to}", e.how, e.arrived,
                          "[green]yes[/green]" if e.ok else "[red]NO[/red]")
        console.print(table)
        all_ok = all(e.ok for e in expects) and left == 0
        console.print(f"ISP mailbox after the session: {left} message(s) left (fetched mail is deleted there)")
        console.print("[bold green]every message arrived where it should[/bold green]" if all_ok
                      else "[bold red]some messages did not arrive where they should[/bold red]")
        if stay:
            console.rule("The system stays up")
            console.print(f"{console_url}\nPress Connect now there to dial again; Ctrl-C ends the demo.")
            await asyncio.Event().wait()  # until Ctrl-C cancels the demo
        return 0 if all_ok else 1
    finally:
        if daemon is not None:
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        await isp.stop()


def _pop3_subjects(port: int, user: str, password: str) -> list[str]:
    try:
        p = poplib.POP3("127.0.0.1", port, timeout=10)
    except OSError:
        return []
    try:
        p.user(user)
        p.pass_(password)
        subjects = []
        for i in range(1, len(p.list()[1]) + 1):
            lines = p.retr(i)[1]
            msg = email.message_from_bytes(b"\r\n".join(lines), policy=default_policy)
            subjects.append(str(msg["Subject"]))
        return subjects
    except poplib.error_proto:
        return []
    finally:
        try:
            p.quit()
        except Exception:
            pass


def _imap_look(port: int, user: str, password: str) -> tuple[list[str], list[str]]:
    """(folders, INBOX subjects) as an IMAP client sees them; PEEK leaves the mail unread."""
    try:
        with imaplib.IMAP4("127.0.0.1", port, timeout=10) as m:
            m.login(user, password)
            folders = [line.decode().rsplit(' "/" ', 1)[-1].strip('"') for line in m.list()[1]]
            m.select("INBOX", readonly=True)
            subjects = []
            for item in m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1]:
                if isinstance(item, tuple):
                    msg = email.message_from_bytes(item[1], policy=default_policy)
                    subjects.append(str(msg["Subject"]))
            return folders, subjects
    except (OSError, imaplib.IMAP4.error):
        return [], []


async def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the gateway daemon exited at start-up")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
