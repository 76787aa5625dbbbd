"""Bringing the configured link up and down: the one way dialmail gets online.

    async with link.up(config, emit) as info:     # Dialing, ModemLine..., Connected
        ...                                        # move mail; info.carrier_lost
                                                   # Hangup, then HungUp once it is down

A dial session (``gateway.session.session``) goes online this way under the lock it holds
for the whole session; ``dialmail queue flush`` goes through ``for_queue_flush``, which
takes the same lock for just the link, so a flush never dials while a session holds the
line.  The link itself (``modem.link``) hangs up on every way out of the block.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from gateway.config import Config
from gateway.mail.errors import TransientError
from gateway.session.events import Connected, Dialing, Event, Hangup, HungUp, ModemLine
from gateway.session.transcript import mask
from modem.errors import LinkError
from modem.link import LinkInfo, open_link
from modem.settings import LinkSettings
from spool.sessions import SessionBusy, SessionLock

Emit = Callable[[Event], None]


def settings_of(config: Config) -> LinkSettings:
    # A loaded configuration has them validated; a Config built in code may carry options only.
    if config.link.settings is not None:
        return config.link.settings
    return LinkSettings.from_options(config.link.type, config.link.options)


@asynccontextmanager
async def up(config: Config, emit: Emit | None = None) -> AsyncIterator[LinkInfo]:
    """The link up for the block; raises ``LinkError`` (saying why) when it does not come up.

    With ``emit`` the link reports itself as session events; without, its dialogue goes
    to the log as ``modem.link`` writes it.
    """
    progress = (lambda text: emit(ModemLine(mask(text)))) if emit is not None else None
    tell = emit or (lambda event: None)
    link = open_link(settings_of(config), progress=progress)
    tell(Dialing(config.link.type))
    async with link.up() as info:
        tell(Connected(info.rate, info.describe()))
        yield info
        # Only a block that finished its work says so; an error or a cancellation is
        # reported by whoever caught it, while the link still hangs up on the way out.
        tell(Hangup())
    if info.hangup:
        tell(HungUp(info.hangup))


@asynccontextmanager
async def for_queue_flush(config: Config) -> AsyncIterator[asyncio.Event | None]:
    """The link for a stand-alone ``dialmail queue flush``; yields the carrier-lost event.

    Always-on links need nothing.  Any other link is brought up under the session lock;
    a busy line or a link that does not come up is a ``TransientError``: the mail waits.
    """
    if config.link.type == "always-on":
        yield None
        return
    lock = SessionLock(config.spool_dir)
    try:
        lock.acquire()
    except SessionBusy as exc:
        raise TransientError(str(exc)) from None
    try:
        try:
            async with up(config) as info:
                yield info.carrier_lost
        except LinkError as exc:
            raise TransientError(f"the link did not come up: {exc}") from None
    finally:
        lock.release()
