"""``dovecot -F`` as a child of ``dialmail run``: started with the daemon, restarted if it
dies, stopped when the daemon stops.

Dovecot's log comes to dialmail's on stderr.  The child gets SIGTERM if dialmail dies
without stopping it (kill -9); a master left over all the same (its pid file under our
base_dir names our configuration) is stopped before a new one starts, or Dovecot would
refuse to start.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from gateway.config import Config
from gateway.imap import dovecotconf, store
from gateway.mail.errors import ConfigError

log = logging.getLogger("dialmail.imap")

STOP_GRACE = 5.0  # Dovecot's master ends its children and exits within a second or two
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)  # after each death in a row; a run of 60 s resets it
STEADY = 60.0
_PR_SET_PDEATHSIG = 1
_SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def find_program(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=_SBIN)


def _die_with_parent() -> None:  # in the child, between fork and exec
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def master_pid(paths: store.DovecotPaths) -> int | None:
    """The pid of a Dovecot master running with our configuration, if any."""
    try:
        pid = int(paths.master_pid.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if str(paths.conf).encode() in cmdline else None


def reload_users(config: Config) -> bool:
    """Tell a managed Dovecot to read the users file now (SIGHUP restarts its auth process).

    Dovecot looks at a passwd-file at most once a second; this makes a user added, removed
    or re-passworded count from the very next login.
    """
    if config.imap.dovecot != "managed":
        return False
    pid = master_pid(store.DovecotPaths(config.spool_dir))
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError:
        return False
    return True


class DovecotSupervisor:
    def __init__(self, config: Config):
        self.config = config
        self.paths = store.DovecotPaths(config.spool_dir)
        self.program = find_program("dovecot")
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.starts = 0
        self._watcher: asyncio.Task | None = None

    async def start(self) -> None:
        if self.program is None:
            raise ConfigError("imap.dovecot: \"managed\" needs Dovecot: apt-get install dovecot-imapd "
                              "(or set dovecot = \"off\")")
        owner = await asyncio.to_thread(store.prepare, self.config)
        await asyncio.to_thread(dovecotconf.write, self.config, owner, self.paths)
        await asyncio.to_thread(self._stop_leftover)
        await self._spawn()
        self._watcher = asyncio.create_task(self._watch(), name="dovecot-supervisor")

    def _stop_leftover(self) -> None:
        pid = master_pid(self.paths)
        if pid is None:
            return
        log.warning("IMAP: stopping Dovecot (pid %d) left running by an earlier dialmail", pid)
        os.kill(pid, signal.SIGTERM)
        for _ in range(int(STOP_GRACE / 0.05)):
            if not Path(f"/proc/{pid}").exists():
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    async def _spawn(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.program, "-F", "-c", str(self.paths.conf),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C on dialmail's terminal is dialmail's to pass on
            preexec_fn=_die_with_parent)
        self.starts += 1
        log.info("IMAP: Dovecot started (pid %d) on %s%s", self.proc.pid,
                 ", ".join(map(str, self.config.imap.listen)), " with STARTTLS" if self.config.imap.tls_cert else "")

    async def _relay_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            serious = any(w in text for w in ("Error:", "Fatal:", "Panic:", "Warning:"))
            level = logging.WARNING if serious and "SIGHUP received" not in text else logging.INFO
            log.log(level, "dovecot: %s", text)

    async def _watch(self) -> None:
        deaths = 0
        loop = asyncio.get_running_loop()
        while True:
            proc = self.proc
            began = loop.time()
            await asyncio.gather(self._relay_log(proc), proc.wait())
            if self.stopping:
                return
            deaths = 0 if loop.time() - began > STEADY else deaths + 1
            delay = RESTART_DELAYS[min(max(deaths - 1, 0), len(RESTART_DELAYS) - 1)]
            log.error("IMAP: Dovecot exited with status %s; starting it again in %.0f s", proc.returncode, delay)
            await asyncio.sleep(delay)
            if self.stopping:
                return
            try:
                await asyncio.to_thread(self._stop_leftover)
                await self._spawn()
            except OSError as exc:
                log.error("IMAP: cannot start Dovecot: %s", exc)

    async def stop(self) -> None:
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        log.info("IMAP: Dovecot stopped")


async def service(daemon):
    """The daemon's IMAP service: Dovecot run by dialmail, or the spool readied for the admin's."""
    config = daemon.config

    async def nothing() -> None:
        return None
    if config.imap.dovecot == "off":
        return nothing
    if config.imap.dovecot == "external":
        await asyncio.to_thread(store.prepare, config)
        log.info("IMAP: served by the admin's Dovecot (%s); its fragment: dialmail dovecot config",
                 config.imap.dovecot_config)
        return nothing
    supervisor = DovecotSupervisor(config)
    await supervisor.start()
    return supervisor.stop
