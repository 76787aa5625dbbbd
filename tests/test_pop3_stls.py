"""STLS against command injection: cleartext pipelined behind STLS never runs under TLS."""
from __future__ import annotations

import asyncio
import ssl

from gateway.config import loads
from gateway.pop3.server import POP3Server
from gateway.pop3.wire import CHUNK
from spool.users import Users
from tests.peers import make_self_signed_cert


def tls_config(tmp_path):
    cert, key = make_self_signed_cert(tmp_path)
    return cert, loads(f"""
[server]
hostname = "mail.office.test"
domains = ["office.test"]
spool_dir = "{tmp_path}"

[pop3]
listen = ["127.0.0.1:0"]
tls_cert = "{cert}"
tls_key = "{key}"
""")


def test_stls_then_commands_over_tls_are_answered(tmp_path):
    cert, config = tls_config(tmp_path)

    async def dialogue() -> tuple[bytes, bytes]:
        server = POP3Server(config, Users(tmp_path))
        await server.start()
        port = server.listeners[0].sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(b"STLS\r\n")
            answer = await reader.readline()
            async with asyncio.timeout(10):
                await writer.start_tls(ssl.create_default_context(cafile=str(cert)))
                writer.write(b"CAPA\r\nQUIT\r\n")
                after = await reader.read()
            writer.close()
            return answer, after
        finally:
            await server.stop()

    answer, after = asyncio.run(dialogue())
    assert answer == b"+OK Begin TLS negotiation\r\n"
    # No STLS offered any more: the capability list is the one under TLS.
    assert after == (b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\n"
                     b"AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN\r\nIMPLEMENTATION dialmail\r\n.\r\n"
                     b"+OK dialmail POP3 server signing off\r\n")


def test_cleartext_queued_behind_stls_closes_the_connection_instead_of_running_under_tls(tmp_path):
    # More than one read's worth behind STLS: the tail is still waiting in the server's
    # stream buffer when the handshake would start (RFC 2595 section 3.1, CVE-2011-0411).
    cert, config = tls_config(tmp_path)
    injected = b"NOOP\r\n" * (CHUNK // 6 + 1000)

    async def dialogue() -> tuple[bytes, bytes, BaseException | None, bytes]:
        server = POP3Server(config, Users(tmp_path))
        await server.start()
        port = server.listeners[0].sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            greeting = await reader.readline()
            writer.write(b"STLS\r\n" + injected)
            await writer.drain()
            answer = await reader.readline()
            refused = None
            try:
                async with asyncio.timeout(10):
                    await writer.start_tls(ssl.create_default_context(cafile=str(cert)))
            except (ssl.SSLError, ConnectionError) as exc:
                refused = exc
            after = b""
            if refused is None:
                async with asyncio.timeout(10):
                    after = await reader.read(100)
            writer.close()
            return greeting, answer, refused, after
        finally:
            await server.stop()

    greeting, answer, refused, after = asyncio.run(dialogue())
    assert greeting.startswith(b"+OK ")
    assert answer == b"+OK Begin TLS negotiation\r\n"
    assert refused is not None, f"handshake succeeded and the injected commands were answered: {after!r}"
    assert after == b""
