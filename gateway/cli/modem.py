"""``dialmail modem ...``: find and identify a modem, or run the simulated one on a pty."""
from __future__ import annotations

import asyncio
import signal
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from modem.driver import HayesModem, candidate_ports
from modem.errors import LinkError
from modem.hayes import DEFAULT_INIT
from modem.pty_server import PtyModemServer
from modem.settings import Route
from modem.shaper import LineShaper
from modem.simulator import SimKnobs

modem_app = typer.Typer(help="Find, identify and simulate modems.", no_args_is_help=True)

_BAUDS = (115200, 57600, 38400, 19200, 9600)


@modem_app.command()
def probe(
    port: Annotated[list[str] | None, typer.Option(
        "--port", "-p", help="Device or pyserial URL to try (repeatable); default: the usual tty paths.")] = None,
    baud: Annotated[list[int] | None, typer.Option(
        "--baud", "-b", help="Port speed to try (repeatable); default: 115200 down to 9600.")] = None,
    init: Annotated[list[str] | None, typer.Option(
        "--init", help="Init string to test (repeatable); default: the built-in ones.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 2.0,
) -> None:
    """Look for a modem like wvdialconf does: answer to AT, init strings, ATI identification."""
    console = Console()
    ports = port or candidate_ports()
    if not ports:
        console.print("No serial ports found (looked at /dev/ttyACM*, /dev/ttyUSB*, /dev/ttyS0-3).")
        raise typer.Exit(code=1)
    found = asyncio.run(_probe(console, ports, tuple(baud or _BAUDS), tuple(init or DEFAULT_INIT), timeout))
    if not found:
        console.print("No modem answered.")
        raise typer.Exit(code=1)


async def _probe(console: Console, ports: list[str], bauds: tuple[int, ...], init: tuple[str, ...],
                 timeout: float) -> int:
    found = 0
    for device in ports:
        for rate in bauds:
            modem = HayesModem(device, rate, command_timeout=timeout, progress=lambda text: None)
            try:
                await modem.open()
            except LinkError as exc:
                console.print(f"{device}: {exc}")
                break  # another speed will not make the device appear
            try:
                answers = await modem.identify(init)
            except LinkError:
                console.print(f"{device} at {rate} bps: no answer to AT")
                continue
            finally:
                await modem.close()
            found += 1
            table = Table(title=f"Modem on {device} at {rate} bps")
            table.add_column("Command")
            table.add_column("Answer")
            for command, answer in answers.items():
                table.add_row(command, answer if isinstance(answer, str) else "\n".join(answer) or "(nothing)")
            console.print(table)
            good_init = [c for c in init if answers.get(c) == "OK"]
            console.print("Suggested configuration:")
            console.print("[link]", markup=False)
            console.print('type = "modem"', markup=False)
            console.print(f'device = "{device}"', markup=False)
            console.print(f"baud = {rate}", markup=False)
            console.print("init = [" + ", ".join(f'"{c}"' for c in good_init) + "]", markup=False)
            console.print('numbers = ["<your ISP\'s number>"]', markup=False)
            break
    return found


@modem_app.command()
def simulate(
    pty: Annotated[str, typer.Option("--pty", help="Path to create as a symlink to the simulated modem's tty.")],
    rate: Annotated[int, typer.Option(help="CONNECT rate in bits per second.")] = 33600,
    busy: Annotated[int, typer.Option(help="Answer the first N dials with BUSY.")] = 0,
    no_answer: Annotated[int, typer.Option(help="Then answer N dials with NO ANSWER.")] = 0,
    no_dialtone: Annotated[int, typer.Option(help="Answer the very first N dials with NO DIALTONE.")] = 0,
    no_carrier: Annotated[int, typer.Option(help="After the busy/no-answer ones, N dials get NO CARRIER.")] = 0,
    dial_delay: Annotated[float, typer.Option(help="Seconds from ATD to the result.")] = 1.0,
    drop_after_seconds: Annotated[float | None, typer.Option(help="Drop carrier N seconds after CONNECT.")] = None,
    drop_after_bytes: Annotated[int | None, typer.Option(help="Drop carrier after N bytes of data.")] = None,
    guard_time: Annotated[float, typer.Option(help="+++ escape guard time in seconds (S12/50).")] = 1.0,
    forward: Annotated[list[str] | None, typer.Option(
        help="Shaped route HOST:PORT->HOST:PORT carried only while connected (repeatable).")] = None,
    latency_ms: Annotated[float, typer.Option(help="One-way latency of shaped routes.")] = 0.0,
) -> None:
    """Serve a simulated Hayes modem on a pseudo-terminal until Ctrl-C or SIGTERM."""
    try:
        knobs = SimKnobs(rate=rate, busy=busy, no_answer=no_answer, no_dialtone=no_dialtone,
                         no_carrier=no_carrier, dial_delay=dial_delay, drop_after_seconds=drop_after_seconds,
                         drop_after_bytes=drop_after_bytes, guard_time=guard_time)
        routes = tuple(Route.parse(r) for r in forward or ())
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    asyncio.run(_simulate(Console(), knobs, pty, routes, latency_ms / 1000))


async def _simulate(console: Console, knobs: SimKnobs, path: str, routes: tuple[Route, ...],
                    latency: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)  # handlers only set a flag; shutdown happens below
    try:
        server = await PtyModemServer(knobs, path).start()
    except OSError as exc:
        console.print(f"cannot serve the simulated modem: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None
    shaper = None
    try:
        server.add_carrier_listener(lambda up, why: console.print(f"carrier {'up' if up else 'down'}: {why}"))
        if routes:
            shaper = await LineShaper(routes, knobs.rate, latency, server).start()
            for route, (host, port) in zip(routes, shaper.addresses):
                console.print(f"shaped route {route} listens on {host}:{port} while connected")
        console.print(f"simulated modem on {path} -> {server.slave_name} ({knobs.rate} bps)", highlight=False)
        await stop.wait()
    finally:
        if shaper is not None:
            await shaper.close()
        await server.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    console.print("simulated modem stopped")
