"""``[smarthost] connections``: a flush over more than one SMTP connection at once."""
import asyncio

from gateway import config as config_mod
from gateway.relay.flush import flush
from tests.test_relay import Proxy, message


def test_two_connections_share_the_queue_and_every_message_goes_once(office, smtp_sink):
    o = office(smtp_sink.port, smarthost="connections = 2")
    ids = [o.send("alice@office.test", ["friend@example.com"], message(f"m{i}")) for i in range(6)]

    async def run():
        async with Proxy(smtp_sink.port) as proxy:
            o.cfg = config_mod.loads(o.path.read_text().replace(f"port = {smtp_sink.port}", f"port = {proxy.port}"))
            seen = []
            result = await flush(o.cfg, o.queue, progress=seen.append)
            return proxy.connections, result, seen

    connections, result, seen = asyncio.run(run())
    assert connections == 2
    assert (result.sent, result.messages, result.error) == (6, 6, None)
    assert sorted(p.qid for p in seen) == sorted(ids)
    # "remaining" counts messages no connection has taken yet
    left = [p.remaining for p in seen]
    assert left == sorted(left, reverse=True) and left[-1] == 0
    got = smtp_sink.wait_messages(6)
    assert sorted(m.message["Subject"] for m in got) == [f"m{i}" for i in range(6)]
    assert all(o.status(qid) == {} for qid in ids)  # settled and removed


def test_by_default_a_flush_of_several_messages_uses_two_connections(office, smtp_sink):
    """The default that measured best on the link benchmark (README, Benchmarks)."""
    o = office(smtp_sink.port, smarthost="# connections: the default")
    for i in range(4):
        o.send("alice@office.test", ["friend@example.com"], message(f"m{i}"))

    async def run():
        async with Proxy(smtp_sink.port) as proxy:
            o.cfg = config_mod.loads(o.path.read_text().replace(f"port = {smtp_sink.port}", f"port = {proxy.port}"))
            r = await flush(o.cfg, o.queue)
            return proxy.connections, r

    connections, result = asyncio.run(run())
    assert o.cfg.smarthost.connections == 2 and connections == 2
    assert (result.sent, result.error) == (4, None)


def test_one_message_opens_one_connection_whatever_the_setting(office, smtp_sink):
    o = office(smtp_sink.port, smarthost="connections = 3")
    o.send("alice@office.test", ["friend@example.com"], message("only"))

    async def run():
        async with Proxy(smtp_sink.port) as proxy:
            o.cfg = config_mod.loads(o.path.read_text().replace(f"port = {smtp_sink.port}", f"port = {proxy.port}"))
            r = await flush(o.cfg, o.queue)
            return proxy.connections, r

    connections, result = asyncio.run(run())
    assert connections == 1
    assert result.messages == 1, result


def test_a_refused_extra_connection_leaves_the_work_to_the_first(office, smtp_sink):
    """A server that takes one connection per client refuses the second at the greeting."""
    o = office(smtp_sink.port, smarthost="connections = 2")
    ids = [o.send("alice@office.test", ["friend@example.com"], message(f"m{i}")) for i in range(4)]
    proxy = Proxy(smtp_sink.port)
    refused = []

    async def first_only(reader, writer):
        if proxy.connections == 0:
            return await proxy._client(reader, writer)
        refused.append(1)
        writer.write(b"421 4.7.0 too many connections from your address\r\n")
        await writer.drain()
        writer.close()

    async def run():
        server = await asyncio.start_server(first_only, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        o.cfg = config_mod.loads(o.path.read_text().replace(f"port = {smtp_sink.port}", f"port = {port}"))
        try:
            return await flush(o.cfg, o.queue)
        finally:
            server.close()

    result = asyncio.run(run())
    assert proxy.connections == 1 and len(refused) == 1
    assert (result.sent, result.messages, result.error) == (4, 4, None)
    assert all(o.status(qid) == {} for qid in ids)
