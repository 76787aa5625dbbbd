"""The real driver against the simulated modem, both through the ``sim://`` pyserial URL
handler (modem lines: CD, DTR) and through a real pseudo-terminal (no modem lines, as a
pty has none), with the same scenarios."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli.modem import modem_app
from modem.driver import HayesModem
from modem.errors import DialFailed, ModemNotResponding, PortUnavailable
from modem.hayes import DialPlan, ResultCode
from modem.pty_server import PtyModemServer
from modem.simulator import SimKnobs, SimLine, register_line, unregister_line
from tests.harness import wait_until

ROOT = Path(__file__).resolve().parent.parent
GUARD = 0.2  # short escape guard time keeps +++ hang-ups quick; the driver waits a bit longer
_names = itertools.count()


@contextlib.asynccontextmanager
async def simulated(kind: str, **knobs):
    """Yield (port for the driver, the simulated modem's controls)."""
    k = SimKnobs(**{"dial_delay": 0.1, "guard_time": GUARD, **knobs})
    if kind == "url":
        name = f"drv{os.getpid()}-{next(_names)}"
        line = SimLine(k)
        register_line(name, line)
        try:
            yield f"sim://{name}", line
        finally:
            unregister_line(name)
            line.close()
    else:
        async with PtyModemServer(k) as server:
            yield server.path, server


def driver(port: str) -> HayesModem:
    return HayesModem(port, guard_time=GUARD + 0.1, command_timeout=2.0, progress=lambda text: None)


def plan(*numbers: str, **kw) -> DialPlan:
    return DialPlan(numbers=numbers or ("5550100",), **{"redial_delay": 0.1, **kw})




kinds = pytest.mark.parametrize("kind", ["url", "pty"])


@kinds
@pytest.mark.timeout(20)
def test_driver_initialises_dials_and_reports_rate_and_protocol(kind):
    async def scenario():
        async with simulated(kind, rate=31200) as (port, sim), driver(port) as modem:
            connected = await modem.dial(plan("0845555"))
            assert connected.result.code is ResultCode.CONNECT
            assert connected.result.rate == 31200
            assert connected.result.protocol == ("ARQ", "V34", "LAPM", "V42BIS")
            assert sim.carrier
            assert sim.modem.commands == ["ATZ", "AT&F E0 V1 Q0 &C1 &D2", "ATDT0845555"]
            await modem.hang_up()
    asyncio.run(scenario())


@kinds
@pytest.mark.timeout(20)
def test_driver_redials_after_busy_and_connects(kind):
    progress: list[str] = []

    async def scenario():
        async with simulated(kind, busy=2) as (port, sim):
            modem = HayesModem(port, guard_time=GUARD + 0.1, progress=progress.append)
            async with modem:
                connected = await modem.dial(plan("111", attempts_per_number=3))
                assert connected.attempt == 3
                assert sim.modem.dials == 3
                await modem.hang_up()
    asyncio.run(scenario())
    assert progress[:3] == ["dialling 111 (attempt 1 of 3)", "111: BUSY", "waiting 0.1 s before redialling"]
    assert progress[-1] == "connected to 111 at 33600 bps ARQ/V34/LAPM/V42BIS"


@kinds
@pytest.mark.timeout(20)
def test_driver_gives_up_after_the_configured_attempts_with_a_clear_message(kind):
    async def scenario():
        async with simulated(kind, busy=100) as (port, sim), driver(port) as modem:
            with pytest.raises(DialFailed) as failed:
                await modem.dial(plan("111", "222", attempts_per_number=2))
            assert sim.modem.dials == 4
            return failed.value
    error = asyncio.run(scenario())
    assert str(error) == "no connection after 4 attempts on 2 numbers: 111 was busy (x2); 222 was busy (x2)"
    assert [f.code for f in error.failures] == [ResultCode.BUSY] * 4


@kinds
@pytest.mark.parametrize("knob, words", [
    ("no_dialtone", "no dial tone: is the phone cable plugged into the modem, and is the line free?"),
    ("no_answer", "111 rang but nobody answered"),
    ("no_carrier", "111 answered but no modem connection was made"),
])
@pytest.mark.timeout(20)
def test_each_failure_reaches_the_user_in_words(kind, knob, words):
    async def scenario():
        async with simulated(kind, **{knob: 5}) as (port, _), driver(port) as modem:
            with pytest.raises(DialFailed) as failed:
                await modem.dial(plan("111", attempts_per_number=1))
            return str(failed.value)
    message = asyncio.run(scenario())
    assert message.startswith("no connection after 1 attempt on 1 number: ")
    assert words in message


@kinds
@pytest.mark.timeout(20)
def test_a_dial_without_answer_is_aborted_and_the_modem_left_idle(kind):
    async def scenario():
        async with simulated(kind, dial_delay=30) as (port, sim), driver(port) as modem:
            with pytest.raises(DialFailed) as failed:
                await modem.dial(plan("111", attempts_per_number=1, connect_timeout=0.5))
            assert sim.modem.state == "command" and not sim.carrier
            assert (await modem.command("AT")).result.code is ResultCode.OK
            return str(failed.value)
    assert "no connection to 111 within 0.5 s: the modem gave no result" in asyncio.run(scenario())


@kinds
@pytest.mark.timeout(20)
def test_hang_up_puts_the_modem_back_on_hook(kind):
    async def scenario():
        async with simulated(kind) as (port, sim), driver(port) as modem:
            await modem.dial(plan())
            assert sim.carrier
            how = await modem.hang_up()
            assert not sim.carrier
            assert (await modem.command("AT")).result.code is ResultCode.OK
            await modem.dial(plan())  # and it can call again
            assert sim.carrier
            await modem.hang_up()
            return how
    how = asyncio.run(scenario())
    if kind == "url":
        assert how == "hung up by dropping DTR"
    else:  # a pty cannot drop DTR: the escape sequence must do it
        assert how == "hung up: the port cannot drop DTR, sent +++ and ATH0"


@pytest.mark.timeout(20)
def test_dropping_dtr_hangs_up_as_soon_as_the_carrier_goes():
    """DTR low only until the modem drops carrier: 0.1 s, not a fixed 0.5 s nor +++ guard times."""
    async def scenario():
        async with simulated("url", guard_time=1.0) as (port, sim), driver(port) as modem:
            await modem.dial(plan())
            started = time.monotonic()
            how = await modem.hang_up()
            took = time.monotonic() - started
            assert not sim.carrier and sim.modem.dtr
            assert (await modem.command("AT")).result.code is ResultCode.OK
            return how, took
    how, took = asyncio.run(scenario())
    assert how == "hung up by dropping DTR"
    assert 0.1 <= took < 0.4, took


@kinds
@pytest.mark.timeout(20)
def test_carrier_drop_is_noticed_within_one_second(kind):
    async def scenario():
        async with simulated(kind) as (port, sim), driver(port) as modem:
            await modem.dial(plan())
            await asyncio.sleep(0.2)
            assert not modem.carrier_lost.is_set()
            sim.drop_carrier("test pulled the phone cable")
            took = await wait_until(modem.carrier_lost.is_set, 1.0, "noticing the carrier drop")
            await modem.hang_up()
            return took, modem.loss_reason
    took, reason = asyncio.run(scenario())
    assert took < 1.0
    if kind == "url":
        assert reason == "the modem dropped carrier detect (CD): the line went dead"
    else:
        assert reason == "the modem reported NO CARRIER: the line dropped"


@kinds
@pytest.mark.timeout(20)
def test_identify_reads_ati_answers(kind):
    async def scenario():
        async with simulated(kind) as (port, _), driver(port) as modem:
            return await modem.identify(("ATZ",), ("ATI3",))
    assert asyncio.run(scenario()) == {"ATZ": "OK", "ATI3": ["dialmail simulated modem V.34"]}


@pytest.mark.timeout(20)
def test_a_silent_port_is_reported_as_a_modem_not_answering():
    async def scenario():
        master, slave = os.openpty()  # a tty with nothing behind it
        try:
            async with driver(os.ttyname(slave)) as modem:
                with pytest.raises(ModemNotResponding) as silent:
                    await modem.dial(plan(command_timeout=0.3))
                return str(silent.value)
        finally:
            os.close(master)
            os.close(slave)
    assert asyncio.run(scenario()).startswith("the modem did not answer 'ATZ' within 0.3 s")


def test_a_missing_device_is_reported_by_name():
    async def scenario():
        with pytest.raises(PortUnavailable) as missing:
            await driver("/dev/ttyS-no-such").open()
        return str(missing.value)
    assert asyncio.run(scenario()).startswith("cannot open the modem port /dev/ttyS-no-such")


# --- the CLI --------------------------------------------------------------------------


@pytest.fixture
def simulate_cli(tmp_path):
    """``dialmail modem simulate --pty PATH`` in its own process."""
    procs = []

    def start(*args: str) -> tuple[Path, subprocess.Popen]:
        path = tmp_path / "ttySIM"
        proc = subprocess.Popen(
            [sys.executable, "-c", "from gateway.cli.modem import modem_app; modem_app()", "simulate",
             "--pty", str(path), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while not path.is_symlink():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"simulator did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.02)
        return path, proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(30)
def test_simulate_command_serves_a_pty_the_driver_can_dial(simulate_cli):
    path, _ = simulate_cli("--busy", "1", "--rate", "26400", "--dial-delay", "0.1", "--guard-time", str(GUARD))
    assert os.readlink(path).startswith("/dev/pts/")

    async def scenario():
        async with driver(str(path)) as modem:
            connected = await modem.dial(plan("123"))
            how = await modem.hang_up()
            return connected, how
    connected, how = asyncio.run(scenario())
    assert connected.result.rate == 26400 and connected.attempt == 2
    assert how == "hung up: the port cannot drop DTR, sent +++ and ATH0"


@pytest.mark.timeout(30)
def test_simulate_command_stops_cleanly_on_sigterm(simulate_cli):
    path, proc = simulate_cli()
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, output
    assert "simulated modem stopped" in output
    assert not path.is_symlink()


@pytest.mark.timeout(30)
def test_simulate_command_forwards_shaped_routes_only_while_connected(simulate_cli):
    async def scenario():
        async def isp(reader, writer):
            writer.write(b"220 isp.test ESMTP\r\n")
            await writer.drain()
        server = await asyncio.start_server(isp, "127.0.0.1", 0)
        isp_port = server.sockets[0].getsockname()[1]
        with socket.socket() as probe:  # a free port for the shaped route
            probe.bind(("127.0.0.1", 0))
            local = probe.getsockname()[1]
        path, _ = await asyncio.to_thread(simulate_cli, "--dial-delay", "0.1", "--guard-time", str(GUARD),
                                          "--forward", f"127.0.0.1:{local}->127.0.0.1:{isp_port}")
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", local)
        async with driver(str(path)) as modem:
            await modem.dial(plan())
            reader, _writer = await asyncio.open_connection("127.0.0.1", local)
            greeting = await asyncio.wait_for(reader.readline(), 5)
            await modem.hang_up()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(100), 2)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", local)
        server.close()
        return greeting
    assert asyncio.run(scenario()) == b"220 isp.test ESMTP\r\n"


def test_simulate_command_never_replaces_a_real_file(tmp_path):
    precious = tmp_path / "ttyS0"
    precious.write_text("not ours")
    result = CliRunner().invoke(modem_app, ["simulate", "--pty", str(precious)])
    assert result.exit_code == 1
    assert f"{precious} exists and is not a symlink; not replacing it" in result.output
    assert precious.read_text() == "not ours"


def test_probe_command_identifies_a_modem_and_suggests_a_link_table():
    result = CliRunner().invoke(modem_app, ["probe", "--port", "sim://?rate=28800", "--baud", "57600"])
    assert result.exit_code == 0, result.output
    assert "dialmail simulated modem V.34" in result.output
    assert 'device = "sim://?rate=28800"' in result.output
    assert "baud = 57600" in result.output
    assert 'init = ["ATZ", "AT&F E0 V1 Q0 &C1 &D2"]' in result.output


def test_probe_command_fails_when_no_modem_answers():
    result = CliRunner().invoke(modem_app, ["probe", "--port", "/dev/ttyS-no-such"])
    assert result.exit_code == 1
    assert "No modem answered." in result.output
