"""The four link backends behind ``async with link.up() as info``, and the ``[link]``
settings that choose them.

pppd cannot run on a kernel without PPP (no /dev/ppp here), so the ``modem`` backend is
tested end to end with the real driver dialling the simulated modem on a pty and a
stand-in pppd script that records its arguments and behaves like ``pppd nodetach``.
The real pppd is still started once: on this kernel it must fail with exit status 4,
and the backend must say so in words and hang up.  A real-pppd negotiation test runs
only where /dev/ppp exists.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from pathlib import Path

import pytest

from modem.errors import DialFailed, LinkConfigError, LinkUpFailed
from modem.hayes import DEFAULT_INIT
from modem.link import open_link
from modem.pty_server import PtyModemServer
from modem.settings import LinkSettings, Route
from modem.simulator import SimKnobs
from tests.harness import wait_until

FAST_DIALER = {"redial_delay": 0.1, "guard_time": 0.3, "command_timeout": 2}




# --- settings ---------------------------------------------------------------------------


def test_modem_settings_for_a_real_serial_port():
    s = LinkSettings.from_options("modem", {
        "device": "/dev/ttyS0", "baud": 57600, "numbers": ["0845 555 0100", "0845-555-0199"],
        "init": ["ATZ", "AT&F E0 V1 &C1 &D2 S7=60"], "dial_method": "pulse", "attempts_per_number": 5,
        "redial_delay": "45s", "give_up_after": "15m", "connect_timeout": 90,
        "pppd_options": "noauth defaultroute usepeerdns nodetach user office", "interface": "ppp1"})
    assert s.dialer.device == "/dev/ttyS0" and s.dialer.baud == 57600
    assert s.dialer.numbers == ("08455550100", "08455550199")
    assert s.dialer.plan().give_up_after == 900 and s.dialer.redial_delay == 45
    assert s.dialer.dial_method == "pulse" and s.dialer.attempts_per_number == 5
    assert s.pppd.options == ("noauth", "defaultroute", "usepeerdns", "nodetach", "user", "office")
    assert s.pppd.interface == "ppp1" == s.interface


def test_defaults_are_sensible():
    s = LinkSettings.from_options("modem", {"device": "/dev/ttyACM0", "numbers": ["5550100"]})
    assert s.dialer.init == DEFAULT_INIT == ("ATZ", "AT&F E0 V1 Q0 &C1 &D2")
    assert s.dialer.baud == 115200 and s.dialer.dial_method == "tone"
    assert s.pppd.path == "/usr/sbin/pppd" and s.pppd.interface == "ppp0"
    assert s.pppd.options == ("noauth", "defaultroute", "usepeerdns", "nodetach")
    assert LinkSettings.from_options("always-on", {}).type == "always-on"


def test_sim_settings_carry_knobs_and_routes():
    s = LinkSettings.from_options("sim", {
        "rate": 28800, "busy": 2, "no_answer": 1, "dial_delay": "500ms", "drop_after_seconds": 30,
        "drop_after_bytes": 100000, "latency_ms": 150,
        "forward": ["127.0.0.1:12525->127.0.0.1:2526", "127.0.0.1:12143 -> 127.0.0.1:2143"]})
    assert s.sim.knobs == SimKnobs(rate=28800, busy=2, no_answer=1, dial_delay=0.5, drop_after_seconds=30,
                                   drop_after_bytes=100000)
    assert s.sim.latency_ms == 150
    assert s.sim.routes == (Route("127.0.0.1", 12525, "127.0.0.1", 2526),
                            Route("127.0.0.1", 12143, "127.0.0.1", 2143))
    assert s.dialer.numbers == ("5550100",)


@pytest.mark.parametrize("type_, options, key, words", [
    ("modem", {"numbers": ["1"]}, "device", "is required"),
    ("modem", {"device": "sim://", "numbers": ["1"]}, "device", "pppd needs a tty path"),
    ("modem", {"device": "/dev/ttyS0"}, "numbers", "at least one phone number"),
    ("modem", {"device": "/dev/ttyS0", "numbers": ["call mum"]}, "numbers", "cannot dial"),
    ("modem", {"device": "/dev/ttyS0", "numbers": ["1"], "dial_method": "rotary"}, "dial_method", "tone"),
    ("modem", {"device": "/dev/ttyS0", "numbers": ["1"], "redial_delay": "soon"}, "redial_delay", "duration"),
    ("modem", {"device": "/dev/ttyS0", "numbers": ["1"], "attempts_per_number": 0}, "attempts_per_number",
     "at least 1"),
    ("modem", {"device": "/dev/ttyS0", "numbers": ["1"], "init": ["Z"]}, "init", "does not start with AT"),
    ("modem", {"device": "/dev/ttyS0", "numbers": ["1"], "up_command": "pon"}, "up_command", "unknown key"),
    ("command", {"interface": "ppp0"}, "up_command", "is required"),
    ("command", {"up_command": "pon isp"}, "interface", "check_command"),
    ("sim", {"forward": ["12525->2526"]}, "forward", "HOST:PORT"),
    ("sim", {"rate": 0}, "rate", "at least 1"),
    ("always-on", {"device": "/dev/ttyS0"}, "device", "unknown key"),
    ("isdn", {}, "type", "must be one of"),
])
def test_bad_link_settings_name_the_key(type_, options, key, words):
    with pytest.raises(LinkConfigError) as bad:
        LinkSettings.from_options(type_, options)
    assert bad.value.key == key
    assert words in bad.value.message
    assert str(bad.value).startswith(f"[link] {key}: ")


# --- always-on ----------------------------------------------------------------------------


def test_always_on_link_has_nothing_to_do():
    async def scenario():
        async with open_link(LinkSettings.from_options("always-on", {"interface": "lo"})).up() as info:
            assert info.backend == "always-on" and info.interface == "lo" and info.rate is None
            assert not info.carrier_lost.is_set()
            assert info.started.tzinfo is not None
    asyncio.run(scenario())


# --- command ------------------------------------------------------------------------------


def command_settings(tmp_path: Path, **extra) -> LinkSettings:
    flag = tmp_path / "link-up"
    log = tmp_path / "log"
    return LinkSettings.from_options("command", {
        "up_command": f"echo up >> {log}; touch {flag}",
        "down_command": f"echo down >> {log}; rm -f {flag}",
        "check_command": ["test", "-e", str(flag)],
        "check_interval": 0.1, "up_timeout": 5, **extra})


@pytest.mark.timeout(20)
def test_command_link_runs_up_waits_for_the_check_and_runs_down(tmp_path):
    async def scenario():
        async with open_link(command_settings(tmp_path)).up() as info:
            assert (tmp_path / "link-up").exists()
            assert info.backend == "command"
            await asyncio.sleep(0.3)
            assert not info.carrier_lost.is_set()
        return info
    info = asyncio.run(scenario())
    assert (tmp_path / "log").read_text() == "up\ndown\n"
    assert not (tmp_path / "link-up").exists()
    assert info.hangup == f"ran echo down >> {tmp_path / 'log'}; rm -f {tmp_path / 'link-up'}"


@pytest.mark.timeout(20)
def test_command_link_waits_for_an_interface(tmp_path):
    settings = LinkSettings.from_options("command", {"up_command": ["true"], "interface": "lo"})
    async def scenario():
        async with open_link(settings).up() as info:
            return info.interface
    assert asyncio.run(scenario()) == "lo"


@pytest.mark.timeout(20)
def test_command_link_notices_the_link_going_away(tmp_path):
    async def scenario():
        async with open_link(command_settings(tmp_path)).up() as info:
            (tmp_path / "link-up").unlink()  # e.g. pppd died behind pon's back
            await asyncio.wait_for(info.wait_carrier_lost(), 2)
            return info.loss_reason
    assert asyncio.run(scenario()) == "the check command failed"


@pytest.mark.timeout(20)
def test_command_link_reports_a_failing_up_command(tmp_path):
    settings = LinkSettings.from_options("command", {
        "up_command": "echo 'pon: no such peer isp' >&2; exit 3", "check_command": "false",
        "down_command": f"touch {tmp_path / 'down-ran'}"})
    async def scenario():
        with pytest.raises(LinkUpFailed) as failed:
            async with open_link(settings).up():
                pass
        return str(failed.value)
    assert asyncio.run(scenario()) == ("the up command \"echo 'pon: no such peer isp' >&2; exit 3\" "
                                       "failed with exit status 3: pon: no such peer isp")
    assert (tmp_path / "down-ran").exists()  # cleaned up anyway


@pytest.mark.timeout(20)
def test_command_link_gives_up_when_the_link_never_comes_up(tmp_path):
    settings = LinkSettings.from_options("command", {"up_command": "true", "check_command": "false",
                                                     "up_timeout": 0.5, "check_interval": 0.1})
    async def scenario():
        with pytest.raises(LinkUpFailed) as failed:
            async with open_link(settings).up():
                pass
        return str(failed.value)
    assert asyncio.run(scenario()) == "the link did not come up within 0.5 s (waited for false)"


# --- modem + pppd (stand-in) --------------------------------------------------------------


async def send_over_loopback(nbytes: int) -> None:
    """Traffic on lo, the interface the stand-in "ppp" link is given."""
    done = asyncio.get_running_loop().create_future()

    async def sink(reader, writer):
        got = 0
        while chunk := await reader.read(65536):
            got += len(chunk)
        done.set_result(got)
        writer.close()
    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    writer.write(b"p" * nbytes)
    await writer.drain()
    writer.close()
    assert await asyncio.wait_for(done, 5) == nbytes
    server.close()

STAND_IN_PPPD = """#!/bin/sh
# Stand-in for pppd: record the arguments, then behave like "pppd nodetach".
trap 'echo terminated >> "{events}"; exit 5' TERM
printf '%s\\n' "$@" > "{args}.tmp" && mv "{args}.tmp" "{args}"
if [ -n "$EXIT_AFTER" ]; then sleep "$EXIT_AFTER"; echo "Modem hangup" ; exit "$EXIT_STATUS"; fi
while :; do sleep 0.05; done
"""


@pytest.fixture
def stand_in_pppd(tmp_path):
    script = tmp_path / "pppd"
    script.write_text(STAND_IN_PPPD.format(args=tmp_path / "pppd-args", events=tmp_path / "pppd-events"))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def modem_settings(device: str, pppd: Path, interface: str = "lo", **extra) -> LinkSettings:
    return LinkSettings.from_options("modem", {
        "device": device, "numbers": ["5550100", "5550199"], "pppd_path": str(pppd),
        "pppd_options": ["noauth", "defaultroute", "usepeerdns", "nodetach"], "interface": interface,
        "up_timeout": 3, **FAST_DIALER, **extra})


@pytest.mark.timeout(30)
def test_modem_link_dials_then_hands_the_port_to_pppd_and_stops_it(tmp_path, stand_in_pppd):
    async def scenario():
        async with PtyModemServer(SimKnobs(dial_delay=0.1, busy=1, rate=28800, guard_time=0.25)) as server:
            link = open_link(modem_settings(server.path, stand_in_pppd))
            async with link.up() as info:
                assert server.carrier
                assert (info.backend, info.rate, info.interface, info.number) == ("modem", 28800, "lo", "5550199")
                assert info.protocol == "ARQ/V34/LAPM/V42BIS"
                await wait_until((tmp_path / "pppd-args").exists, 2, "pppd starting")
                await send_over_loopback(20000)
                assert info.bytes_up >= 20000 and info.bytes_down >= 20000  # the interface's counters
            assert not server.carrier  # hung up on the way out
            return server.path, info
    device, info = asyncio.run(scenario())
    assert (tmp_path / "pppd-args").read_text().split("\n")[:-1] == [
        device, "115200", "noauth", "defaultroute", "usepeerdns", "nodetach"]
    assert (tmp_path / "pppd-events").read_text() == "terminated\n"
    assert info.hangup == "hung up: the port cannot drop DTR, sent +++ and ATH0"


def test_pppd_is_always_kept_in_the_foreground(stand_in_pppd):
    link = open_link(modem_settings("/dev/ttyS0", stand_in_pppd, pppd_options="noauth user office"))
    assert link.pppd_command("/dev/ttyS0") == [str(stand_in_pppd), "/dev/ttyS0", "115200", "noauth", "user",
                                               "office", "nodetach"]


@pytest.mark.timeout(30)
def test_pppd_ending_is_reported_as_carrier_loss(tmp_path, stand_in_pppd, monkeypatch):
    monkeypatch.setenv("EXIT_AFTER", "0.5")
    monkeypatch.setenv("EXIT_STATUS", "16")

    async def scenario():
        async with PtyModemServer(SimKnobs(dial_delay=0.1, guard_time=0.25)) as server, \
                open_link(modem_settings(server.path, stand_in_pppd)).up() as info:
            return await asyncio.wait_for(info.wait_carrier_lost(), 5)
    assert asyncio.run(scenario()) == "pppd ended: the modem hung up"


@pytest.mark.timeout(30)
def test_pppd_failing_before_the_interface_comes_up_says_why(tmp_path, stand_in_pppd, monkeypatch):
    monkeypatch.setenv("EXIT_AFTER", "0")
    monkeypatch.setenv("EXIT_STATUS", "4")

    async def scenario():
        async with PtyModemServer(SimKnobs(dial_delay=0.1, guard_time=0.25)) as server:
            with pytest.raises(LinkUpFailed) as failed:
                async with open_link(modem_settings(server.path, stand_in_pppd, "dmppp9")).up():
                    pass
            return str(failed.value), server.carrier
    message, carrier = asyncio.run(scenario())
    assert message == "the kernel has no PPP support (no /dev/ppp) (pppd exit status 4): Modem hangup"
    assert not carrier


@pytest.mark.needs_kernel
@pytest.mark.skipif(os.path.exists("/dev/ppp") or shutil.which("pppd") is None,
                    reason="needs the real pppd on a kernel without PPP support")
@pytest.mark.timeout(30)
def test_real_pppd_without_kernel_ppp_is_reported_in_words_and_the_line_hung_up():
    """The real pppd from Debian, started by the modem backend on the simulated line."""
    async def scenario():
        async with PtyModemServer(SimKnobs(dial_delay=0.1, guard_time=0.25)) as server:
            settings = LinkSettings.from_options("modem", {
                "device": server.path, "numbers": ["5550100"], "up_timeout": 10, **FAST_DIALER})
            with pytest.raises(LinkUpFailed) as failed:
                async with open_link(settings).up():
                    pass
            return str(failed.value), server.carrier, server.modem.connects
    message, carrier, connects = asyncio.run(scenario())
    assert message.startswith("the kernel has no PPP support (no /dev/ppp) (pppd exit status 4)")
    assert connects == 1 and not carrier


@pytest.mark.needs_kernel
@pytest.mark.skipif(not os.path.exists("/dev/ppp") or shutil.which("pppd") is None or os.geteuid() != 0,
                    reason="real pppd needs /dev/ppp (this kernel has no PPP support) and root")
@pytest.mark.timeout(60)
def test_real_pppd_over_the_simulated_modem(tmp_path):
    """Where PPP exists, pppd at least gets as far as negotiating on the simulated line."""
    async def scenario():
        async with PtyModemServer(SimKnobs(dial_delay=0.1, guard_time=0.25)) as server:
            settings = modem_settings(server.path, Path(shutil.which("pppd")), "ppp7",
                                      pppd_options=["noauth", "nodetach", "local", "unit", "7",
                                                    "lcp-max-configure", "2"])
            with pytest.raises(LinkUpFailed) as failed:  # nobody speaks PPP on the far side
                async with open_link(settings).up():
                    pass
            return str(failed.value)
    assert "PPP negotiation" in asyncio.run(scenario())


# --- sim ----------------------------------------------------------------------------------


def sim_settings(isp_port: int, **extra) -> LinkSettings:
    return LinkSettings.from_options("sim", {
        "rate": 57600, "dial_delay": 0.1, "forward": [f"127.0.0.1:0->127.0.0.1:{isp_port}"],
        **FAST_DIALER, **extra})


async def start_isp():
    async def greet(reader, writer):
        writer.write(b"* OK simulated ISP IMAP ready\r\n")
        await writer.drain()
        while data := await reader.read(1000):
            writer.write(data)
            await writer.drain()
    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.timeout(30)
def test_sim_link_dials_with_the_real_driver_and_opens_the_shaped_routes():
    async def scenario():
        server, port = await start_isp()
        link = open_link(sim_settings(port, busy=1))
        async with link.up() as info:
            assert (info.backend, info.rate, info.number) == ("sim", 57600, "5550100")
            (address,) = info.addresses.values()
            reader, writer = await asyncio.open_connection(*address)
            assert await reader.readline() == b"* OK simulated ISP IMAP ready\r\n"
            writer.write(b"a LOGOUT\r\n")
            assert await reader.readline() == b"a LOGOUT\r\n"
            assert (info.bytes_up, info.bytes_down) == (10, 41)
            writer.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*address)
        server.close()
        return info
    info = asyncio.run(scenario())
    assert info.hangup == "hung up by dropping DTR"
    assert not info.carrier_lost.is_set()


@pytest.mark.timeout(30)
def test_sim_link_signals_carrier_loss_within_a_second_and_cuts_traffic():
    async def scenario():
        server, port = await start_isp()
        link = open_link(sim_settings(port, drop_after_seconds=1.0))
        async with link.up() as info:
            dropped: list[float] = []
            link.line.add_carrier_listener(lambda up, why: dropped.append(time.monotonic()))
            reader, _writer = await asyncio.open_connection(*next(iter(info.addresses.values())))
            await reader.readline()
            reason = await asyncio.wait_for(info.wait_carrier_lost(), 3)
            noticed_after = time.monotonic() - dropped[0]
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(100), 1)
        server.close()
        return reason, noticed_after
    reason, noticed_after = asyncio.run(scenario())
    assert reason == "the modem dropped carrier detect (CD): the line went dead"
    assert noticed_after < 1.0


@pytest.mark.timeout(30)
def test_sim_link_reports_why_dialling_failed():
    async def scenario():
        link = open_link(LinkSettings.from_options("sim", {
            "busy": 5, "numbers": ["111", "222"], "attempts_per_number": 2, "dial_delay": 0.05,
            **FAST_DIALER}))
        with pytest.raises(DialFailed) as failed:
            async with link.up():
                pass
        return str(failed.value)
    assert asyncio.run(scenario()) == ("no connection after 4 attempts on 2 numbers: 111 was busy (x2); "
                                       "222 was busy (x2)")


# --- hang-up guarantees -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_an_exception_in_the_session_still_hangs_up():
    async def scenario():
        server, port = await start_isp()
        link = open_link(sim_settings(port))
        with pytest.raises(RuntimeError, match="relay crashed"):
            async with link.up() as info:
                line = link.line
                assert line.carrier
                raise RuntimeError("relay crashed")
        server.close()
        return line, info
    line, info = asyncio.run(scenario())
    assert not line.carrier and info.hangup == "hung up by dropping DTR"


@pytest.mark.timeout(30)
def test_cancelling_the_session_hangs_up_even_if_cancelled_again():
    async def scenario():
        server, port = await start_isp()
        link = open_link(sim_settings(port))
        online = asyncio.Event()
        seen: dict[str, object] = {}

        async def session():
            async with link.up() as info:
                seen["line"], seen["info"] = link.line, info
                online.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(session())
        await asyncio.wait_for(online.wait(), 10)
        task.cancel()
        # Cancel again while the hang-up holds DTR low.
        await wait_until(lambda: not seen["line"].modem.dtr, 2, "the hang-up dropping DTR")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        server.close()
        return seen
    seen = asyncio.run(scenario())
    assert not seen["line"].carrier
    assert seen["info"].hangup == "hung up by dropping DTR"


@pytest.mark.timeout(30)
def test_cancelling_while_dialling_leaves_the_line_on_hook():
    async def scenario():
        link = open_link(LinkSettings.from_options("sim", {"dial_delay": 30, **FAST_DIALER}))
        task = asyncio.create_task(link.up().__aenter__())
        await wait_until(lambda: link.line is not None and link.line.modem.state == "dialing", 5, "dialling")
        line = link.line
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return line
    line = asyncio.run(scenario())
    assert line.modem.state == "command" and not line.carrier
