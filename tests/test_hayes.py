"""The Hayes dialogue in memory: result parsing, command parsing, the dial/redial
machine, and the simulated modem's engine — no port, no clock, no sleeping."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modem.hayes import (
    CONNECT_RATE_CODES,
    AbortDial,
    Command,
    CommandSyntaxError,
    Connected,
    Dialer,
    DialPlan,
    GaveUp,
    Info,
    Pause,
    Paused,
    Reply,
    Result,
    ResultCode,
    ResultParser,
    SendCommand,
    TimedOut,
    format_result,
    parse_command_line,
    parse_line,
)
from modem.simulator import SimKnobs, SimulatedModem

# --- result codes ---------------------------------------------------------------------


@pytest.mark.parametrize("line, code", [
    ("OK", ResultCode.OK), ("ERROR", ResultCode.ERROR), ("RING", ResultCode.RING),
    ("BUSY", ResultCode.BUSY), ("NO CARRIER", ResultCode.NO_CARRIER),
    ("NO DIALTONE", ResultCode.NO_DIALTONE), ("NO DIAL TONE", ResultCode.NO_DIALTONE),
    ("NO ANSWER", ResultCode.NO_ANSWER), ("no carrier", ResultCode.NO_CARRIER),
    ("DELAYED", ResultCode.DELAYED), ("BLACKLISTED", ResultCode.BLACKLISTED),
])
def test_verbose_result_codes_are_recognised(line, code):
    assert parse_line(line) == Result(code, text=line)


@pytest.mark.parametrize("line, rate, protocol", [
    ("CONNECT 33600/ARQ/V34/LAPM/V42BIS", 33600, ("ARQ", "V34", "LAPM", "V42BIS")),
    ("CONNECT 115200", 115200, ()),
    ("CONNECT", None, ()),
    ("CONNECT 28800 V42bis", 28800, ("V42bis",)),
    ("CONNECT 31200/ARQ/V90", 31200, ("ARQ", "V90")),
    ("CONNECT 26400 LAPM/V42BIS", 26400, ("LAPM", "V42BIS")),
])
def test_connect_lines_give_rate_and_protocol(line, rate, protocol):
    result = parse_line(line)
    assert result.code is ResultCode.CONNECT
    assert (result.rate, result.protocol) == (rate, protocol)


@pytest.mark.parametrize("line, code, rate", [
    ("0", ResultCode.OK, None), ("1", ResultCode.CONNECT, None), ("2", ResultCode.RING, None),
    ("3", ResultCode.NO_CARRIER, None), ("4", ResultCode.ERROR, None), ("6", ResultCode.NO_DIALTONE, None),
    ("7", ResultCode.BUSY, None), ("8", ResultCode.NO_ANSWER, None), ("10", ResultCode.CONNECT, 2400),
    ("18", ResultCode.CONNECT, 57600),
])
def test_numeric_result_codes_are_recognised(line, code, rate):
    result = parse_line(line)
    assert (result.code, result.rate) == (code, rate)


def test_other_lines_are_information_not_results():
    for text in ("CONNECTED TO FOO", "CARRIER 33600", "PROTOCOL: LAPM", "U.S. Robotics 56K", "33600"):
        assert parse_line(text) == Info(text)


def test_parser_reads_a_verbose_dialogue_with_echo():
    parser = ResultParser()
    events = parser.feed(b"ATDT5551234\r\r\nCARRIER 33600\r\n\r\nCONNECT 33600/ARQ/V34\r\n~\x7d\x23")
    assert events[0] == Info("ATDT5551234")
    assert events[1] == Info("CARRIER 33600")
    assert events[2].code is ResultCode.CONNECT and events[2].rate == 33600
    assert parser.online
    assert bytes(parser.trailing) == b"~\x7d\x23"  # the start of PPP: data, not results


def test_parser_reads_numeric_results_ending_in_bare_cr():
    parser = ResultParser()
    assert [e.code for e in parser.feed(b"0\r7\r3\r")] == [ResultCode.OK, ResultCode.BUSY,
                                                             ResultCode.NO_CARRIER]


_TRANSCRIPT = (b"ATZ\r\r\nOK\r\n\r\nRING\r\n\r\nBUSY\r\n\r\nNO DIAL TONE\r\n0\r"
               b"\r\nCONNECT 33600/ARQ/V34/LAPM/V42BIS\r\nDATA")


@given(st.lists(st.integers(min_value=1, max_value=len(_TRANSCRIPT)), max_size=12))
def test_parser_result_does_not_depend_on_how_bytes_arrive(cuts):
    whole = ResultParser()
    expected = whole.feed(_TRANSCRIPT)
    parser = ResultParser()
    events = []
    start = 0
    for cut in sorted(set(cuts)) + [len(_TRANSCRIPT)]:
        events += parser.feed(_TRANSCRIPT[start:cut])
        start = cut
    assert events == expected
    assert parser.trailing == whole.trailing == bytearray(b"DATA")


@given(code=st.sampled_from([c for c in ResultCode if c.numeric is not None and c is not ResultCode.CONNECT]),
       verbose=st.booleans())
def test_every_result_the_simulator_formats_parses_back(code, verbose):
    parser = ResultParser()
    (event,) = parser.feed(format_result(Result(code), verbose))
    assert event.code is code


@given(rate=st.sampled_from(sorted(set(CONNECT_RATE_CODES.values())) + [28800, 33600, 53333]),
       verbose=st.booleans())
def test_connect_rate_survives_formatting_where_the_mode_can_carry_it(rate, verbose):
    (event,) = ResultParser().feed(format_result(Result(ResultCode.CONNECT, rate=rate, protocol=("V34",)),
                                                 verbose))
    assert event.code is ResultCode.CONNECT
    if verbose or rate in CONNECT_RATE_CODES.values():
        assert event.rate == rate


# --- commands ---------------------------------------------------------------------------


def test_command_line_split_like_a_modem_does():
    assert parse_command_line("&F E0 V1 Q0 &C1 &D2") == [
        Command("&F"), Command("E", "0"), Command("V", "1"), Command("Q", "0"), Command("&C", "1"),
        Command("&D", "2")]
    assert parse_command_line("Q0 V1 E1 S0=0 &C1 &D2 +FCLASS=0") == [
        Command("Q", "0"), Command("V", "1"), Command("E", "1"), Command("S", "0=0"), Command("&C", "1"),
        Command("&D", "2"), Command("+FCLASS", "=0")]
    assert parse_command_line("S12?") == [Command("S", "12?")]
    assert parse_command_line("DT 555-1234") == [Command("D", "T 555-1234")]
    assert parse_command_line("L1M0DP0123") == [Command("L", "1"), Command("M", "0"), Command("D", "P0123")]
    with pytest.raises(CommandSyntaxError):
        parse_command_line("&")


# --- the dialer -------------------------------------------------------------------------


def ok(at=0.0):
    return Reply(Result(ResultCode.OK), at)


def res(code, at=0.0, rate=None):
    return Reply(Result(code, rate=rate), at)


def test_dialer_initialises_then_dials_and_connects():
    d = Dialer(DialPlan(numbers=("111",), init=("ATZ", "AT&F")))
    assert d.start(0) == SendCommand("ATZ", 5.0)
    assert d.handle(ok()) == SendCommand("AT&F", 5.0)
    assert d.handle(ok()) == SendCommand("ATDT111", 60.0)
    action = d.handle(res(ResultCode.CONNECT, rate=33600))
    assert isinstance(action, Connected) and action.result.rate == 33600 and action.number == "111"
    assert d.finished


def test_pulse_dialling_uses_atdp():
    d = Dialer(DialPlan(numbers=("0123",), init=(), dial_method="pulse"))
    assert d.start(0) == SendCommand("ATDP0123", 60.0)


def test_redial_after_busy_tries_the_next_number_at_once_and_waits_between_rounds():
    d = Dialer(DialPlan(numbers=("111", "222"), init=(), attempts_per_number=2, redial_delay=30))
    assert d.start(0) == SendCommand("ATDT111", 60.0)
    assert d.handle(res(ResultCode.BUSY, 1)) == SendCommand("ATDT222", 60.0)
    assert d.handle(res(ResultCode.BUSY, 2)) == Pause(30, "waiting 30 s before redialling")
    assert d.handle(Paused(32)) == SendCommand("ATDT111", 60.0)
    assert d.current == ("111", 2)
    action = d.handle(res(ResultCode.CONNECT, 33))
    assert isinstance(action, Connected) and action.attempt == 2


def test_gives_up_after_the_configured_attempts_and_says_why():
    d = Dialer(DialPlan(numbers=("111", "222"), init=(), attempts_per_number=2, redial_delay=1))
    d.start(0)
    d.handle(res(ResultCode.BUSY))
    d.handle(res(ResultCode.NO_ANSWER))
    d.handle(Paused(1))
    d.handle(res(ResultCode.BUSY))
    action = d.handle(res(ResultCode.NO_ANSWER))
    assert isinstance(action, GaveUp)
    assert len(action.failures) == 4
    assert action.reason == ("no connection after 4 attempts on 2 numbers: 111 was busy (x2); "
                             "222 rang but nobody answered (x2)")


def test_gives_up_when_the_total_time_is_spent():
    d = Dialer(DialPlan(numbers=("111",), init=(), attempts_per_number=10, redial_delay=30,
                        give_up_after=100))
    d.start(0)
    assert isinstance(d.handle(res(ResultCode.BUSY, 10)), Pause)
    assert isinstance(d.handle(Paused(40)), SendCommand)
    action = d.handle(res(ResultCode.BUSY, 75))  # a further 30 s wait would pass 100 s
    assert isinstance(action, GaveUp)
    assert action.reason.startswith("giving up after 75 s (limit 100 s): 111 was busy (x2)")


@pytest.mark.parametrize("code, words", [
    (ResultCode.BUSY, "111 was busy"),
    (ResultCode.NO_ANSWER, "rang but nobody answered"),
    (ResultCode.NO_CARRIER, "no modem connection was made"),
    (ResultCode.NO_DIALTONE, "no dial tone: is the phone cable plugged into the modem"),
    (ResultCode.ERROR, "the modem refused to dial '111'"),
    (ResultCode.DELAYED, "refuses to redial"),
    (ResultCode.BLACKLISTED, "blacklisted"),
])
def test_every_dial_failure_is_explained_in_words(code, words):
    d = Dialer(DialPlan(numbers=("111",), init=(), attempts_per_number=1))
    d.start(0)
    action = d.handle(res(code))
    assert isinstance(action, GaveUp)
    assert words in action.reason
    assert action.failures[0].code is code


def test_a_number_the_modem_refuses_is_not_redialled():
    d = Dialer(DialPlan(numbers=("12x", "222"), init=(), attempts_per_number=3, redial_delay=0))
    d.start(0)
    assert d.handle(res(ResultCode.ERROR)) == SendCommand("ATDT222", 60.0)
    assert isinstance(d.handle(res(ResultCode.BUSY)), Pause)
    assert d.handle(Paused(0)) == SendCommand("ATDT222", 60.0)


def test_a_dial_without_result_is_aborted_and_counted():
    d = Dialer(DialPlan(numbers=("111",), init=(), attempts_per_number=1, connect_timeout=45))
    d.start(0)
    assert d.handle(TimedOut(45)) == AbortDial(5.0)
    action = d.handle(res(ResultCode.NO_CARRIER, 46))
    assert isinstance(action, GaveUp)
    assert "no connection to 111 within 45 s: the modem gave no result" in action.reason


def test_a_silent_modem_is_reported_as_such():
    d = Dialer(DialPlan(numbers=("111",)))
    d.start(0)
    action = d.handle(TimedOut(5))
    assert isinstance(action, GaveUp) and not action.failures
    assert "the modem did not answer 'ATZ' within 5 s" in action.reason


def test_a_rejected_init_string_is_named():
    d = Dialer(DialPlan(numbers=("111",), init=("ATZ", "AT&F \\N3")))
    d.start(0)
    d.handle(ok())
    action = d.handle(res(ResultCode.ERROR))
    assert isinstance(action, GaveUp) and "rejected the init string 'AT&F \\\\N3' (ERROR)" in action.reason


# --- the simulated modem's engine, with a hand-turned clock ------------------------------


class Bench:
    """The engine plus a parser reading its output; time moves only when we say."""

    def __init__(self, **knobs):
        self.modem = SimulatedModem(SimKnobs(**knobs))
        self.parser = ResultParser()
        self.now = 0.0

    def send(self, data: bytes, after: float = 0.0) -> list:
        self.now += after
        self.modem.receive(data, self.now)
        return self.read()

    def wait(self, seconds: float) -> list:
        end = self.now + seconds
        while (deadline := self.modem.next_deadline()) is not None and deadline <= end:
            self.now = deadline
            self.modem.tick(self.now)
        self.now = end
        return self.read()

    def read(self) -> list:
        return self.parser.feed(self.modem.take_output())

    def codes(self, events) -> list:
        return [e.code for e in events if isinstance(e, Result)]


def test_simulator_echoes_until_told_not_to_and_answers_ati():
    b = Bench()
    assert b.send(b"AT\r") == [Info("AT"), Result(ResultCode.OK, text="OK")]
    assert b.codes(b.send(b"ATE0\r")) == [ResultCode.OK]
    assert b.send(b"ATI3\r") == [Info("dialmail simulated modem V.34"), Result(ResultCode.OK, text="OK")]
    assert b.codes(b.send(b"ATV0\r")) == [ResultCode.OK]
    assert b.modem.take_output() == b"" and b.send(b"AT\r") == [Result(ResultCode.OK, text="0")]
    assert b.codes(b.send(b"ATX?\r")) == [ResultCode.ERROR]


def test_simulator_dials_after_the_delay_and_follows_its_script():
    b = Bench(busy=1, no_answer=1, dial_delay=2.0, rate=28800)
    b.send(b"ATE0\r")
    assert b.send(b"ATDT1\r") == []
    assert b.wait(1.9) == []
    assert b.codes(b.wait(0.1)) == [ResultCode.BUSY]
    b.send(b"ATDT1\r")
    assert b.codes(b.wait(2)) == [ResultCode.NO_ANSWER]
    b.send(b"ATDT1\r")
    (connect,) = b.wait(2)
    assert connect.code is ResultCode.CONNECT and connect.rate == 28800 and b.modem.carrier


def test_simulator_escape_needs_the_guard_time_on_both_sides():
    b = Bench(dial_delay=0, guard_time=1.0)
    b.send(b"ATE0DT1\r")
    b.wait(0)
    b.parser = ResultParser()
    assert b.send(b"+++", after=0.5) == []  # too soon after data: just data
    assert b.wait(2) == [] and b.modem.state == "online"
    b.send(b"+++", after=1.0)
    assert b.send(b"x", after=0.5) == []  # data inside the trailing guard cancels it
    assert b.wait(2) == [] and b.modem.state == "online"
    b.send(b"+++", after=1.0)
    assert b.codes(b.wait(1.0)) == [ResultCode.OK]
    assert b.modem.carrier  # escaped, still connected
    assert b.codes(b.send(b"ATH0\r")) == [ResultCode.OK]
    assert not b.modem.carrier


def test_simulator_hangs_up_on_dtr_drop_and_on_a_line_drop():
    b = Bench(dial_delay=0, drop_after_seconds=30)
    b.send(b"ATE0DT1\r")
    b.wait(0)
    b.parser = ResultParser()
    b.modem.set_dtr(False, b.now)
    assert b.codes(b.read()) == [ResultCode.NO_CARRIER] and not b.modem.carrier
    b.modem.set_dtr(True, b.now)
    b.send(b"ATD1\r")
    b.wait(0)
    b.parser = ResultParser()
    assert b.wait(29.9) == []
    assert b.codes(b.wait(0.1)) == [ResultCode.NO_CARRIER]


def test_simulator_drops_after_the_configured_bytes():
    b = Bench(dial_delay=0, drop_after_bytes=1000)
    b.send(b"ATE0DT1\r")
    b.wait(0)
    b.parser = ResultParser()
    b.send(b"x" * 600)
    b.modem.count_data(300, b.now)  # carried by the shaper
    assert b.modem.carrier
    assert b.codes(b.send(b"x" * 100)) == [ResultCode.NO_CARRIER] and not b.modem.carrier


def test_a_keystroke_aborts_a_dial_in_progress():
    b = Bench(dial_delay=30)
    b.send(b"ATE0\r")
    b.send(b"ATD1\r")
    assert b.codes(b.send(b"\r", after=1)) == [ResultCode.NO_CARRIER]
    assert b.wait(60) == [] and not b.modem.carrier


def run_dialer_against_engine(plan: DialPlan, **knobs) -> tuple[object, float, SimulatedModem]:
    """The sans-IO dialer against the sans-IO simulator: the whole dialogue in memory."""
    b = Bench(**knobs)
    dialer = Dialer(plan)
    action = dialer.start(b.now)
    while not isinstance(action, (Connected, GaveUp)):
        if isinstance(action, Pause):
            b.wait(action.seconds)
            action = dialer.handle(Paused(b.now))
            continue
        if isinstance(action, SendCommand):
            b.parser.back_to_command_state()
            events = b.send(action.command.encode() + b"\r")
        else:
            events = b.send(b"\r")
        deadline = b.now + action.timeout
        finals = [e for e in events if isinstance(e, Result) and e.is_final]
        while not finals and (nd := b.modem.next_deadline()) is not None and nd <= deadline:
            finals = [e for e in b.wait(nd - b.now) if isinstance(e, Result) and e.is_final]
        if finals:
            action = dialer.handle(Reply(finals[0], b.now))
        else:
            b.now = deadline
            action = dialer.handle(TimedOut(b.now))
    return action, b.now, b.modem


def test_dialer_and_simulator_agree_busy_twice_then_connect():
    plan = DialPlan(numbers=("111",), attempts_per_number=3, redial_delay=30)
    action, now, modem = run_dialer_against_engine(plan, busy=2, dial_delay=5)
    assert isinstance(action, Connected) and action.attempt == 3
    assert now == pytest.approx(3 * 5 + 2 * 30)
    assert modem.commands == ["ATZ", "AT&F E0 V1 Q0 &C1 &D2", "ATDT111", "ATDT111", "ATDT111"]


@settings(max_examples=40, deadline=None)
@given(busy=st.integers(0, 6), no_answer=st.integers(0, 3), attempts=st.integers(1, 4),
       numbers=st.integers(1, 3))
def test_dialer_connects_exactly_when_the_script_allows_it(busy, no_answer, attempts, numbers):
    plan = DialPlan(numbers=tuple(str(100 + i) for i in range(numbers)), attempts_per_number=attempts,
                    redial_delay=10, give_up_after=None)
    action, _, modem = run_dialer_against_engine(plan, busy=busy, no_answer=no_answer, dial_delay=1)
    allowed = attempts * numbers
    if busy + no_answer < allowed:
        assert isinstance(action, Connected) and modem.dials == busy + no_answer + 1
    else:
        assert isinstance(action, GaveUp) and len(action.failures) == allowed == modem.dials
