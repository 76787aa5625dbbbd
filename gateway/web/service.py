"""The console as a daemon service: uvicorn serving the Starlette app in the daemon's loop.

The sockets are bound here, so an address in use is dialmail's one-line error rather
than uvicorn's ``sys.exit``; uvicorn's own signal handlers are left out, since the
daemon's stop flag already stops every service in order.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

from gateway.mail.errors import OperationalError
from gateway.session.runner import SessionRunner

log = logging.getLogger("dialmail.web")

# Browsers following a session's progress hold their connection open: at shutdown they
# get this long before uvicorn cuts them.
STOP_GRACE = 2.0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OperationalError(f"web console: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def service(daemon):
    """Daemon service: the web console on ``[web] listen``; nothing without a ``[web]`` section."""
    web = daemon.config.web
    if not web.listen:
        async def nothing():
            return None
        return nothing
    # Imported only for a console: a daemon without one does not carry the web stack (~20 MiB).
    import uvicorn

    from gateway.web import login
    from gateway.web.console import WebConsole
    from gateway.web.progress import SessionFeed

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield  # the daemon owns SIGTERM and SIGINT

    runner = getattr(daemon, "sessions", None)
    if runner is None:
        runner = daemon.sessions = SessionRunner(daemon)
    feed = SessionFeed()
    follow = daemon.spawn(feed.follow(runner.subscribe()), "web-progress")
    secret = await asyncio.to_thread(login.cookie_secret, daemon.config.spool_dir)
    console = await asyncio.to_thread(WebConsole, daemon, runner, feed, secret)  # opens spool tables
    sockets = [_bind(listen.host, listen.port) for listen in web.listen]
    config = uvicorn.Config(console.app, lifespan="off", access_log=False, log_config=None,
                            timeout_graceful_shutdown=STOP_GRACE,
                            ssl_certfile=str(web.tls_cert) if web.tls_cert else None,
                            ssl_keyfile=str(web.tls_key) if web.tls_key else None,
                            ssl_version=ssl.PROTOCOL_TLS_SERVER)
    server = Server(config)
    task = daemon.spawn(server.serve(sockets=sockets), "web-console")
    scheme = "https" if web.tls_cert else "http"
    log.info("web console on %s", ", ".join(f"{scheme}://{listen}" for listen in web.listen))

    async def stop():
        await feed.close()
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, STOP_GRACE + 3)
        follow.cancel()
        for sock in sockets:
            sock.close()

    return stop
