"""Local delivery in a process of its own, as Postfix's local(8) is to its smtpd.

On a thread of the daemon, delivery's Python competed with the SMTP event loop for the
interpreter lock: under a burst of SMTP clients it managed a fifth of what it delivers
alone, and the mailboxes fell seconds behind.  In its own process it has an interpreter
of its own and the machine's other cores.

The daemon starts it (``python -m gateway.delivery.process PID``) and talks over its
stdin and stdout: first the daemon's configuration and logging (pickled: both ends are
this program), then one byte for each kick (new local mail, a released message); the
process answers one byte each time it has delivered everything due and goes idle.  It
delivers exactly as the thread did (``LocalDelivery.run_once``, exactly once across a
kill -9 by its claims and fixed Maildir names).  When its stdin ends it finishes the
pass it is in and exits; when the daemon is killed it goes with it.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import threading

from gateway.delivery.worker import IDLE, LocalDelivery, until_due
from gateway.office.directory import Directory
from spool.locks import die_with_parent, ignore_stop_signals
from spool.queue import Catalogue, Queue
from spool.users import Users

log = logging.getLogger("dialmail.deliver")


def serve(delivery: LocalDelivery, kicks: int, idle: int, interval: float = 60.0) -> None:
    """Deliver at each kick read from ``kicks`` (a descriptor), and when due, until it ends."""
    wake = threading.Event()
    ended = threading.Event()

    def read_kicks() -> None:
        try:
            while os.read(kicks, 4096):  # any number of kicks is one more pass
                wake.set()
        except OSError:
            pass
        ended.set()
        wake.set()
    threading.Thread(target=read_kicks, name="kicks", daemon=True).start()
    while not ended.is_set():
        wake.clear()
        try:
            while delivery.run_once() and not ended.is_set():
                pass
        except Exception:
            log.exception("local delivery pass failed; will retry")
        try:
            os.write(idle, IDLE)
        except OSError:
            return  # the daemon is gone
        wake.wait(until_due(delivery.queue, interval))


def main() -> None:
    daemon = int(sys.argv[1])
    ignore_stop_signals()
    if not die_with_parent(daemon):
        return
    handshake = pickle.load(sys.stdin.buffer)  # noqa: S301 - from the daemon that started us
    logging.basicConfig(level=handshake["log_level"], stream=sys.stderr, format=handshake["log_format"])
    for name, level in handshake.get("log_levels", {}).items():
        logging.getLogger(name).setLevel(level)
    config = handshake["config"]
    catalogue = Catalogue(config.spool_dir)
    try:
        queue = Queue(catalogue)
        directory = Directory(config, Users(config.spool_dir))
        serve(LocalDelivery(config, queue, directory), sys.stdin.fileno(), sys.stdout.fileno())
    finally:
        catalogue.close()


if __name__ == "__main__":
    main()
