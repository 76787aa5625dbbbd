"""Catalogue loss and corruption at random, between rounds of real mail through the real
daemon.  Each round: clients submit mail over SMTP (every 250 noted), some of it is
delivered, the daemon is killed with SIGKILL (its WAL stays as it was), one damage is
done to the spool -- the catalogue truncated or deleted, its WAL deleted, a WAL frame or
a catalogue page corrupted, a queued body truncated -- and the daemon is started again
(after ``dialmail spool repair`` when it refuses a damaged catalogue).  Then the queue is
flushed and local delivery finishes, and every message acknowledged so far must have
arrived: none lost, none twice."""
import os
import random
import signal
import smtplib
import time
from collections import Counter
from email import message_from_bytes

import pytest

from spool.queue import CATALOGUE
from tests.harness import wait_for
from tests.peers import PeerStartError

pytestmark = [pytest.mark.peer, pytest.mark.timeout(3000)]

DAMAGES = ("truncate catalogue", "delete catalogue", "delete WAL", "corrupt WAL frame", "corrupt catalogue page",
           "truncate body")


def msg(mid: str, rcpt: str, size: int) -> bytes:
    return (f"From: alice@office.test\r\nTo: {rcpt}\r\nSubject: {mid}\r\nMessage-ID: <{mid}@office.test>\r\n\r\n"
            + ("z" * 70 + "\r\n") * (size // 72)).encode()


class Round:
    def __init__(self, site, rnd: random.Random):
        self.site, self.rnd = site, rnd
        self.serial = 0
        self.out: set[str] = set()                    # acknowledged, for outside
        self.local: dict[str, str] = {}               # acknowledged Message-ID -> user

    def submit(self, n: int) -> None:
        with smtplib.SMTP("127.0.0.1", self.site.smtp_port, timeout=20) as c:
            for _ in range(n):
                self.serial += 1
                mid = f"m{self.serial}"
                local = self.rnd.random() < 0.5
                rcpt = f"{self.rnd.choice(('alice', 'bob'))}@office.test" if local else f"p{self.serial}@out.test"
                c.sendmail("alice@office.test", [rcpt], msg(mid, rcpt, self.rnd.randint(200, 4000)))
                if local:
                    self.local[mid] = rcpt.split("@")[0]
                else:
                    self.out.add(mid)


def damage(site, kind: str, rnd: random.Random) -> str:
    db = site.spool / CATALOGUE
    wal, shm = db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")
    if kind in ("truncate catalogue", "delete catalogue"):
        if kind == "delete catalogue":
            db.unlink(missing_ok=True)
        else:
            os.truncate(db, 0)
        wal.unlink(missing_ok=True)
        shm.unlink(missing_ok=True)
    elif kind == "delete WAL" or (kind == "corrupt WAL frame" and (not wal.exists() or wal.stat().st_size < 32)):
        wal.unlink(missing_ok=True)
        shm.unlink(missing_ok=True)
        return "delete WAL"
    elif kind == "corrupt WAL frame":
        data = bytearray(wal.read_bytes())
        page = int.from_bytes(data[8:12], "big")
        frames = (len(data) - 32) // (24 + page)
        if frames:
            at = 32 + rnd.randrange(frames) * (24 + page) + 24 + rnd.randrange(page - 16)
            data[at:at + 16] = bytes(b ^ 0x5A for b in data[at:at + 16])
            wal.write_bytes(bytes(data))
        shm.unlink(missing_ok=True)
    elif kind == "corrupt catalogue page":
        size = db.stat().st_size if db.exists() else 0
        pages = size // 4096
        if pages:
            with open(db, "r+b") as f:
                f.seek(rnd.randrange(pages) * 4096)
                f.write(bytes(rnd.randrange(256) for _ in range(4096)))
    elif kind == "truncate body":
        bodies = sorted((site.spool / "queue" / "msg").iterdir())
        if bodies:
            body = rnd.choice(bodies)
            os.truncate(body, max(0, body.stat().st_size - 7))  # the tail goes; the headers stay
    return kind


def start_or_repair(site) -> bool:
    """Start the daemon; when it refuses a damaged catalogue, repair and start again."""
    try:
        site.start()
        return False
    except PeerStartError:
        site.stop()
        assert "'dialmail spool repair'" in site.log().splitlines()[-1], site.log()[-2000:]
        r = site.cli("spool", "repair")
        assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
        site.start()
        return True


def release_held(site) -> int:
    """What ``spool check`` lists as a damaged body is sent with the command it names."""
    r = site.cli("spool", "check")
    released = 0
    for line in r.stdout.decode().splitlines():
        if "were accepted" in line:
            qid = line.split(":")[0]
            assert site.cli("queue", "release", qid).returncode == 0
            released += 1
    return released


def queue_empty(site) -> bool:
    return site.cli("queue", "list").stdout.decode().startswith("queue is empty")


def arrived(site, sink) -> tuple[Counter, Counter]:
    out = Counter(str(m.message["Subject"]) for m in sink.messages())
    local: Counter = Counter()
    for user in ("alice", "bob"):
        for raw in site.mail_of(user):
            local[str(message_from_bytes(raw)["Subject"])] += 1
    return out, local


def test_catalogue_damage_loses_no_acknowledged_message(site, smtp_sink, torture_long):
    rounds = 50 if torture_long else 10
    seed = int(time.time())
    rnd = random.Random(seed)
    site.write_config(f"""
        [smarthost]
        host = "127.0.0.1"
        port = {smtp_sink.port}
        starttls = "off"
        """)
    r = Round(site, rnd)
    done: Counter = Counter()
    kinds = [DAMAGES[i % len(DAMAGES)] for i in range(rounds)]  # each damage at least once
    rnd.shuffle(kinds)
    try:
        site.start()
        for i in range(rounds):
            r.submit(rnd.randint(2, 6))
            if rnd.random() < 0.5:  # some of it delivered before the damage, so outcomes are at stake too
                assert site.cli("queue", "flush").returncode in (0, 1)
            r.submit(rnd.randint(1, 4))  # and some only in the WAL
            time.sleep(rnd.uniform(0.0, 0.3))
            # A page corrupted under a WAL is usually shadowed by a newer copy there: corrupt
            # it in a checkpointed file (a clean stop) so SQLite reads the damaged page.
            site.stop(signal.SIGTERM if kinds[i] == "corrupt catalogue page" else signal.SIGKILL)
            kind = damage(site, kinds[i], rnd)
            repaired = start_or_repair(site)
            done[kind + (" (repaired)" if repaired else "")] += 1
            for _ in range(3):
                release_held(site)
                assert site.cli("queue", "flush").returncode in (0, 1)
                try:
                    wait_for(lambda: queue_empty(site), timeout=30, what="an empty queue")
                    break
                except TimeoutError:
                    continue
            else:
                raise AssertionError(f"round {i} ({kind}): the queue did not drain:\n"
                                     + site.cli("queue", "list").stdout.decode() + site.log()[-3000:])
            out, local = arrived(site, smtp_sink)
            lost = sorted((r.out - set(out)) | (set(r.local) - set(local)))
            twice = sorted([m for m, n in out.items() if n > 1] + [m for m, n in local.items() if n > 1])
            assert not lost, f"seed {seed}, round {i} ({kind}): LOST {lost}\n{site.log()[-3000:]}"
            assert not twice, f"seed {seed}, round {i} ({kind}): DUPLICATED {twice}\n{site.log()[-3000:]}"
            check = site.cli("spool", "check")
            assert check.returncode == 0, check.stdout.decode()
    finally:
        site.stop()
    print(f"\ncatalogue damage: seed {seed}, {rounds} rounds, {r.serial} messages acknowledged, "
          f"0 lost, 0 duplicated; damages: {dict(done)}")
