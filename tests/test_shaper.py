"""The line shaper against real sockets on 127.0.0.1: it carries traffic only while
the simulated modem has carrier, at the connect rate, and cuts everything on a drop."""
from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from modem.settings import Route
from modem.shaper import LineShaper, _Direction
from modem.simulator import SimKnobs, SimLine
from tests.harness import wait_until


@contextlib.asynccontextmanager
async def isp(handler):
    """A stand-in ISP server on an ephemeral port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.asynccontextmanager
async def line_and_shaper(isp_port: int, rate: int = 33600, latency: float = 0.0, routes: int = 1, **knobs):
    line = SimLine(SimKnobs(rate=rate, dial_delay=0.0, **knobs))
    shaper = LineShaper([Route("127.0.0.1", 0, "127.0.0.1", isp_port)] * routes, rate, latency, line)
    await shaper.start()
    try:
        yield line, shaper
    finally:
        await shaper.close()
        line.close()


async def off_hook(line: SimLine, shaper: LineShaper) -> None:
    line.write(b"ATE0D5550100\r")
    await wait_until(lambda: shaper.is_open, 2.0, "the shaper opening on CONNECT")




async def read_exactly(reader: asyncio.StreamReader, n: int) -> float:
    got = 0
    while got < n:
        chunk = await reader.read(65536)
        assert chunk, f"connection ended after {got} of {n} bytes"
        got += len(chunk)
    return time.monotonic()


def test_the_line_books_chunks_back_to_back_at_the_connect_rate():
    # The pace, with the clock given: 4200 bytes are one second of a 33600 bit/s line.
    line = _Direction(33600)
    assert line.book(4200, now=10.0) == 11.0
    assert line.book(4200, now=10.0) == 12.0  # queued behind the first
    assert line.book(4200, now=12.02) == 13.0  # a sender back a little late keeps the pace
    assert line.book(4200, now=20.0) == 21.0  # an idle line starts again from now


@pytest.mark.timeout(30)
def test_every_byte_crosses_each_way_and_is_counted():
    rate = 1_000_000
    size = 23100
    result: dict[str, object] = {}

    async def scenario():
        up = asyncio.get_running_loop().create_future()

        async def serve(reader, writer):
            writer.write(b"d" * size)
            up.set_result(await reader.readexactly(size))
            await writer.drain()
            writer.close()

        async with isp(serve) as port, line_and_shaper(port, rate) as (line, shaper):
            await off_hook(line, shaper)
            reader, writer = await asyncio.open_connection(*shaper.addresses[0])
            writer.write(b"u" * size)
            result.update(down=await reader.readexactly(size), up=await up)
            writer.close()
            result.update(bytes_up=shaper.bytes_up, bytes_down=shaper.bytes_down)

    asyncio.run(scenario())
    assert result["up"] == b"u" * size and result["down"] == b"d" * size
    assert result["bytes_up"] == result["bytes_down"] == size


# Wall-clock figures (throughput within 10 %, sharing, latency) are in bench/shaper_rate.py;
# the two tests below only check that the shaper is never faster than the line, which a
# loaded machine cannot make fail.

@pytest.mark.timeout(20)
def test_connections_share_one_line():
    rate = 19200  # 2400 bytes/s: two 2400-byte downloads at once take two seconds, not one

    async def scenario():
        async def serve(reader, writer):
            writer.write(b"d" * 2400)
            await writer.drain()
            writer.close()

        async with isp(serve) as port, line_and_shaper(port, rate, routes=2) as (line, shaper):
            await off_hook(line, shaper)
            start = time.monotonic()
            conns = [await asyncio.open_connection(*addr) for addr in shaper.addresses]
            ends = await asyncio.gather(*(read_exactly(r, 2400) for r, _ in conns))
            return max(ends) - start

    assert asyncio.run(scenario()) >= 1.8


@pytest.mark.timeout(20)
def test_latency_is_added_each_way():
    async def scenario():
        async def echo(reader, writer):
            while data := await reader.read(100):
                writer.write(data)
                await writer.drain()

        async with isp(echo) as port, line_and_shaper(port, 1_000_000, latency=0.15) as (line, shaper):
            await off_hook(line, shaper)
            reader, writer = await asyncio.open_connection(*shaper.addresses[0])
            start = time.monotonic()
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            return time.monotonic() - start

    assert asyncio.run(scenario()) >= 0.28


@pytest.mark.timeout(20)
def test_connections_are_refused_while_on_hook():
    async def scenario():
        async def serve(reader, writer):
            writer.write(b"220 isp ready\r\n")
            await writer.drain()

        async with isp(serve) as port, line_and_shaper(port, 115200) as (line, shaper):
            address = shaper.addresses[0]
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*address)  # before dialling
            await off_hook(line, shaper)
            reader, _writer = await asyncio.open_connection(*address)
            assert await reader.readline() == b"220 isp ready\r\n"
            line.set_dtr(False)  # the computer hangs up
            await wait_until(lambda: not shaper.is_open, 1.0, "the shaper closing on hang-up")
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*address)
            assert shaper.addresses[0] == address  # same port, ready for the next call

    asyncio.run(scenario())


async def _cut_scenario(drop, **knobs) -> tuple[list[float], list[float], int]:
    """Open three busy connections through the line, drop carrier with ``drop``, and time
    how long each client and each ISP-side connection takes to see the end."""
    isp_ends: list[float] = []

    async def stream(reader, writer):
        try:
            while True:
                writer.write(b"x" * 1024)
                await writer.drain()
                await asyncio.sleep(0.01)
        except (ConnectionError, OSError):
            pass
        isp_ends.append(time.monotonic())

    async with isp(stream) as port, line_and_shaper(port, 33600, routes=3, **knobs) as (line, shaper):
        await off_hook(line, shaper)
        conns = [await asyncio.open_connection(*addr) for addr in shaper.addresses]
        for reader, _ in conns:
            assert await reader.read(10)  # data is flowing on every connection
        await wait_until(lambda: shaper.active_connections == 3, 1.0, "three forwarded connections")
        dropped_at = await drop(line)

        async def until_cut(reader) -> float:
            try:
                while await reader.read(65536):
                    pass
            except ConnectionResetError:
                pass
            return time.monotonic() - dropped_at

        client_cuts = await asyncio.wait_for(asyncio.gather(*(until_cut(r) for r, _ in conns)), 5)
        await wait_until(lambda: len(isp_ends) == 3, 5.0, "the ISP side of every connection ending")
        return client_cuts, [t - dropped_at for t in isp_ends], shaper.connections_cut


@pytest.mark.timeout(20)
def test_carrier_drop_cuts_every_shaped_connection_within_a_second():
    async def drop(line):
        line.drop_carrier("the test pulled the phone cable")
        return time.monotonic()

    client_cuts, isp_cuts, counted = asyncio.run(_cut_scenario(drop))
    assert max(client_cuts) < 1.0, client_cuts
    assert max(isp_cuts) < 1.0, isp_cuts
    assert counted == 3


@pytest.mark.timeout(20)
def test_scripted_drop_after_bytes_cuts_every_shaped_connection():
    async def drop(line):
        await wait_until(lambda: not line.carrier, 5.0, "the scripted drop")
        return time.monotonic()

    client_cuts, isp_cuts, counted = asyncio.run(_cut_scenario(drop, drop_after_bytes=6000))
    assert max(client_cuts) < 1.0 and max(isp_cuts) < 1.0
    assert counted == 3
