"""A session copies the modem's AT dialogue into its transcript by taking over the
modem.dialogue logger; however it ends (a failed dial, an interrupt, a cancellation, an
error while it is being logged) every logger of the process is left exactly as it was."""
import asyncio
import logging

import pytest

from gateway.config import load
from gateway.daemon import Spool
from gateway.session.events import Event, ModemLine
from gateway.session.session import (
    Session,
    SessionContext,
    SessionControl,
    run_with_retries,
)

pytestmark = pytest.mark.timeout(60)

DIALOGUE = logging.getLogger("modem.dialogue")


def sim_site(site, dial_delay: str, busy: int = 0) -> SessionContext:
    site.write_config(f"""
        [link]
        type = "sim"
        dial_delay = "{dial_delay}"
        busy = {busy}
        attempts_per_number = 1
        redial_delay = "0.1s"
        """)
    cfg = load(site.config_path)
    return SessionContext(cfg, Spool(cfg))


def loggers() -> dict[str, tuple]:
    """Level, propagation, handlers and disabled flag of every logger the process has."""
    named = {name: logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)}
    named["(root)"] = logging.getLogger()
    return {name: (lg.level, lg.propagate, tuple(lg.handlers), lg.disabled) for name, lg in named.items()}


class OwnHandler(logging.Handler):
    """A handler the process set up itself before the session: it must still be there after."""

    def emit(self, record: logging.LogRecord) -> None:
        pass


@pytest.fixture
def dialogue_configured():
    """modem.dialogue as a daemon might have set it up: its own level, handler and propagation."""
    own = OwnHandler()
    saved = (DIALOGUE.level, DIALOGUE.propagate)
    DIALOGUE.setLevel(logging.WARNING)
    DIALOGUE.addHandler(own)
    DIALOGUE.propagate = True
    yield
    DIALOGUE.removeHandler(own)
    DIALOGUE.setLevel(saved[0])
    DIALOGUE.propagate = saved[1]


def assert_left_as_found(before: dict[str, tuple]) -> None:
    after = loggers()
    changed = {name: (before[name], state) for name, state in after.items()
               if name in before and state != before[name]}
    assert changed == {}
    # Loggers first created meanwhile (a module imported late) carry only the defaults.
    fresh = {name: state for name, state in after.items()
             if name not in before and state != (logging.NOTSET, True, (), False)}
    assert fresh == {}


def transcript_of(rec) -> str:
    with open(rec.transcript, encoding="utf-8") as f:
        return f.read()


def test_failed_dial_leaves_every_logger_as_it_was(site, dialogue_configured):
    ctx = sim_site(site, "0.1s", busy=5)
    before = loggers()
    try:
        rec = asyncio.run(Session(ctx, "manual", "send").run())
    finally:
        ctx.spool.close()
    assert rec.outcome == "failed"
    assert "[at] > ATD" in transcript_of(rec)  # the dialogue did reach the transcript meanwhile
    assert_left_as_found(before)


def test_interrupted_dial_leaves_every_logger_as_it_was(site, dialogue_configured):
    ctx = sim_site(site, "30s")
    control = SessionControl()

    def interrupt_once_dialling(event: Event) -> None:
        if isinstance(event, ModemLine) and event.text.startswith("dialling"):
            control.interrupt("the test")

    before = loggers()
    try:
        rec = asyncio.run(run_with_retries(ctx, "manual", "send", emit=interrupt_once_dialling, control=control))
    finally:
        ctx.spool.close()
    assert rec.outcome == "interrupted"
    assert rec.errors[0].startswith("interrupted by the test while dialing")
    assert "[at] > ATD" in transcript_of(rec)
    assert_left_as_found(before)


def test_session_cut_off_by_cancellation_leaves_every_logger_as_it_was(site, dialogue_configured):
    """A second Ctrl-C or a shutdown past its grace period cancels the session's task outright."""
    ctx = sim_site(site, "30s")

    async def cut_off() -> Session:

        def cancel_once_dialling(event: Event) -> None:
            if isinstance(event, ModemLine) and event.text.startswith("dialling"):
                task.cancel()

        session = Session(ctx, "manual", "send", emit=cancel_once_dialling)
        task = asyncio.ensure_future(session.run())
        with pytest.raises(asyncio.CancelledError):
            await task
        return session

    before = loggers()
    try:
        session = asyncio.run(cut_off())
    finally:
        ctx.spool.close()
    assert session.record.errors[-1] == "cut off while dialing"
    assert_left_as_found(before)


def test_session_whose_log_fails_still_leaves_every_logger_as_it_was(site, dialogue_configured):
    """The spool's catalogue closed under a session: completing its record raises, nothing else leaks."""
    ctx = sim_site(site, "0.1s", busy=5)

    def close_the_catalogue_once_dialling(event: Event) -> None:
        if isinstance(event, ModemLine) and event.text.startswith("dialling"):
            ctx.spool.close()

    before = loggers()
    with pytest.raises(Exception, match="closed"):
        asyncio.run(Session(ctx, "manual", "send", emit=close_the_catalogue_once_dialling).run())
    assert_left_as_found(before)
    # and the line's lock is free for the next session
    from spool.sessions import SessionLock
    lock = SessionLock(site.spool)
    lock.acquire()
    lock.release()
