"""The line shaper's pace against the wall clock: throughput each way at the connect rate,
two connections sharing one line, and the added latency, each printed as measured/expected.

    .venv/bin/python bench/shaper_rate.py [--rate 33600] [--seconds 5.5]

tests/test_shaper.py proves the booking arithmetic with explicit times and that every byte
crosses; how close real timers come to it depends on the machine's load, so it is reported
here rather than asserted in the test suite (a ratio near 1.00 is right).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_shaper import isp, line_and_shaper, off_hook, read_exactly  # noqa: E402


async def throughput(rate: int, seconds: float) -> tuple[float, float]:
    size = int(rate / 8 * seconds)
    up_done = asyncio.get_running_loop().create_future()

    async def serve(reader, writer):
        writer.write(b"d" * size)
        up_done.set_result(await read_exactly(reader, size))
        await writer.drain()
        writer.close()

    async with isp(serve) as port, line_and_shaper(port, rate) as (line, shaper):
        await off_hook(line, shaper)
        start = time.monotonic()
        reader, writer = await asyncio.open_connection(*shaper.addresses[0])
        writer.write(b"u" * size)
        down_end = await read_exactly(reader, size)
        up_end = await up_done
        writer.close()
    return size * 8 / (up_end - start), size * 8 / (down_end - start)


async def shared(rate: int, each: int) -> float:
    async def serve(reader, writer):
        writer.write(b"d" * each)
        await writer.drain()
        writer.close()

    async with isp(serve) as port, line_and_shaper(port, rate, routes=2) as (line, shaper):
        await off_hook(line, shaper)
        start = time.monotonic()
        conns = [await asyncio.open_connection(*addr) for addr in shaper.addresses]
        ends = await asyncio.gather(*(read_exactly(r, each) for r, _ in conns))
    return max(ends) - start


async def round_trip(latency: float) -> float:
    async def echo(reader, writer):
        with contextlib.suppress(asyncio.CancelledError):  # the shaper closing ends it
            while data := await reader.read(100):
                writer.write(data)
                await writer.drain()

    async with isp(echo) as port, line_and_shaper(port, 1_000_000, latency=latency) as (line, shaper):
        await off_hook(line, shaper)
        reader, writer = await asyncio.open_connection(*shaper.addresses[0])
        start = time.monotonic()
        writer.write(b"ping")
        await reader.readexactly(4)
        took = time.monotonic() - start
        writer.close()
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=33600)
    ap.add_argument("--seconds", type=float, default=5.5)
    args = ap.parse_args()
    up, down = asyncio.run(throughput(args.rate, args.seconds))
    each = args.rate // 8  # one second of the line per connection: two take two seconds
    both = asyncio.run(shared(args.rate, each))
    rtt = asyncio.run(round_trip(0.15))
    print(f"{'measure':<44}{'measured':>14}{'expected':>14}{'ratio':>8}")
    for what, got, want in [(f"up at {args.rate} bit/s (bit/s)", up, args.rate),
                            (f"down at {args.rate} bit/s (bit/s)", down, args.rate),
                            ("two connections, one line (s)", both, 2 * each * 8 / args.rate),
                            ("round trip with 150 ms latency (s)", rtt, 0.30)]:
        print(f"{what:<44}{got:>14.2f}{want:>14.2f}{got / want:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
