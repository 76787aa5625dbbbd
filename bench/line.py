"""The simulated modem line both setups dial: dialmail's PtyModemServer and LineShaper,
run in a thread of the benchmark so every carrier change and every shaped byte is seen
with one clock, whoever dialled.  The admin setup dials with the same Hayes driver
dialmail uses (ATD, and on a pty +++ ATH0 to hang up), so both pay the same call set-up
and tear-down."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from modem.driver import HayesModem
from modem.hayes import DialPlan
from modem.pty_server import PtyModemServer
from modem.settings import Route
from modem.shaper import LineShaper
from modem.simulator import SimKnobs


@dataclass
class Call:
    """One call as the line saw it: CONNECT to hang-up, and the bytes shaped meanwhile."""
    connected: float
    hung_up: float
    bytes_up: int
    bytes_down: int

    @property
    def seconds(self) -> float:
        return self.hung_up - self.connected


class SimulatedLine:
    def __init__(self, pty: Path, routes: list[str], rate: int, latency_ms: float, dial_delay: float = 0.5):
        self.pty = Path(pty)
        self.routes = tuple(Route.parse(r) for r in routes)
        self.rate = rate
        self.latency = latency_ms / 1000
        self.knobs = SimKnobs(rate=rate, dial_delay=dial_delay)
        self.calls: list[Call] = []
        self._up: tuple[float, int, int] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="line", daemon=True)
        self._modem: HayesModem | None = None

    def _run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> SimulatedLine:
        self._thread.start()
        self._run(self._start())
        return self

    async def _start(self) -> None:
        self.server = await PtyModemServer(self.knobs, self.pty).start()
        self.shaper = await LineShaper(self.routes, self.rate, self.latency, self.server).start()
        self.server.add_carrier_listener(self._carrier)

    def _carrier(self, up: bool, why: str) -> None:
        now = time.monotonic()
        if up:
            self._up = (now, self.shaper.bytes_up, self.shaper.bytes_down)
        elif self._up is not None:
            t0, u0, d0 = self._up
            self.calls.append(Call(t0, now, self.shaper.bytes_up - u0, self.shaper.bytes_down - d0))
            self._up = None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return self.shaper.addresses

    def stop(self) -> None:
        async def close():
            await self.shaper.close()
            await self.server.close()
        try:
            self._run(close(), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # -- the admin's dialler (what a ppp-up script plus chat would do)

    def dial(self) -> None:
        async def go():
            self._modem = HayesModem(str(self.pty), 115200, progress=lambda text: None)
            await self._modem.open()
            await self._modem.dial(DialPlan(numbers=("5550100",), redial_delay=0.5))
        self._run(go())

    def hang_up(self) -> None:
        async def go():
            modem, self._modem = self._modem, None
            try:
                await modem.hang_up()
            finally:
                await modem.close()
        self._run(go())

    def call_after(self, earlier: int, timeout: float = 30) -> Call:
        """The call that followed the first ``earlier`` ones, once it has hung up."""
        deadline = time.monotonic() + timeout
        while len(self.calls) <= earlier:
            if time.monotonic() > deadline:
                raise TimeoutError("the line never hung up")
            time.sleep(0.02)
        return self.calls[earlier]
