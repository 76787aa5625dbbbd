"""The link: Hayes AT dialer on pyserial, link backends and the simulated modem.

What the rest of dialmail uses::

    from modem.settings import LinkSettings      # LinkSettings.from_options(type, options)
    from modem.link import open_link             # open_link(settings, progress=callable)
    from modem.errors import LinkError, LinkConfigError

    async with open_link(settings).up() as info:  # info: modem.link.LinkInfo
        info.rate, info.interface, info.started, info.bytes_up, info.bytes_down
        await info.wait_carrier_lost()            # or info.carrier_lost (asyncio.Event)

Modules, in pipeline order: ``hayes`` (the AT dialogue without I/O), ``driver`` (it on a
pyserial port), ``simulator`` / ``pty_server`` / ``urlhandler`` (the simulated modem and
the two ways to reach it), ``shaper`` (ISP traffic at modem speed while connected),
``settings`` and ``link`` (the four backends).  Nothing here imports the gateway or the
spool.
"""
