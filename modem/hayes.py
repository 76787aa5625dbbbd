"""The Hayes AT dialogue without I/O: result codes, their parser, the command-line
parser the simulated modem uses, and the dial/redial state machine.

Nothing here touches a port or reads a clock.  The real driver (``modem.driver``) and
the simulated modem (``modem.simulator``) both speak through these names, so a result
code is spelled once for the whole product and for the tests.

Dialogue shape (verbose, ``V1``)::

    DTE: AT&F E0 V1 Q0 &C1 &D2<CR>        DCE: <CR><LF>OK<CR><LF>
    DTE: ATDT5551234<CR>                  DCE: <CR><LF>CONNECT 33600/ARQ/V34/LAPM/V42BIS<CR><LF>

Numeric (``V0``) results are a number followed by a bare ``<CR>``.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

CR = b"\r"
LF = b"\n"

#: Escape to command state: three ``+`` framed by silence of at least the guard time (S12).
ESCAPE_SEQUENCE = b"+++"
DEFAULT_GUARD_TIME = 1.0

#: Reset, then a known profile: factory defaults, no echo, word results, results on,
#: DCD follows the carrier, DTR drop hangs up.
DEFAULT_INIT = ("ATZ", "AT&F E0 V1 Q0 &C1 &D2")


class ResultCode(enum.Enum):
    """A modem's final (or unsolicited) result; the value is the verbose text."""

    OK = "OK"
    CONNECT = "CONNECT"
    RING = "RING"
    NO_CARRIER = "NO CARRIER"
    ERROR = "ERROR"
    NO_DIALTONE = "NO DIALTONE"
    BUSY = "BUSY"
    NO_ANSWER = "NO ANSWER"
    DELAYED = "DELAYED"
    BLACKLISTED = "BLACKLISTED"

    @property
    def numeric(self) -> int | None:
        return _NUMERIC_OF.get(self)


_NUMERIC_OF = {
    ResultCode.OK: 0, ResultCode.CONNECT: 1, ResultCode.RING: 2, ResultCode.NO_CARRIER: 3,
    ResultCode.ERROR: 4, ResultCode.NO_DIALTONE: 6, ResultCode.BUSY: 7, ResultCode.NO_ANSWER: 8,
}
_CODE_OF_NUMBER = {n: c for c, n in _NUMERIC_OF.items()}

#: Numeric codes that are CONNECT at a given rate (the common Hayes/Rockwell table; vendors
#: differ above 19, so higher rates are sent and read as plain ``1``).
CONNECT_RATE_CODES = {5: 1200, 9: 600, 10: 2400, 11: 4800, 12: 9600, 13: 7200, 14: 12000,
                      15: 14400, 16: 19200, 17: 38400, 18: 57600, 19: 115200}
_RATE_CODE_OF = {rate: n for n, rate in CONNECT_RATE_CODES.items()}

#: Verbose spellings seen in the wild that mean the same as a canonical code.
_ALIASES = {"NO DIAL TONE": ResultCode.NO_DIALTONE, "NO DIALTONE": ResultCode.NO_DIALTONE,
            "NO CARRIER": ResultCode.NO_CARRIER, "NO ANSWER": ResultCode.NO_ANSWER}

#: Results that end a dial attempt without a connection.
DIAL_FAILURES = frozenset({ResultCode.BUSY, ResultCode.NO_ANSWER, ResultCode.NO_CARRIER,
                           ResultCode.NO_DIALTONE, ResultCode.ERROR, ResultCode.DELAYED,
                           ResultCode.BLACKLISTED, ResultCode.OK})


@dataclass(frozen=True)
class Result:
    """One result code as read from the modem (or to be sent by the simulator)."""

    code: ResultCode
    rate: int | None = None
    protocol: tuple[str, ...] = ()
    text: str = ""

    @property
    def is_final(self) -> bool:
        return self.code is not ResultCode.RING

    def describe(self) -> str:
        """The CONNECT line as a user would read it, e.g. ``33600 bps V34/LAPM/V42BIS``."""
        if self.code is not ResultCode.CONNECT:
            return self.code.value
        parts = [f"{self.rate} bps" if self.rate else "unknown speed"]
        if self.protocol:
            parts.append("/".join(self.protocol))
        return " ".join(parts)


@dataclass(frozen=True)
class Info:
    """Any other line: command echo, ATI text, ``CARRIER 33600``, ``PROTOCOL: LAPM``."""

    text: str


Event = Result | Info

_CONNECT_RE = re.compile(r"^CONNECT(?:\s+(\d+))?(.*)$", re.IGNORECASE)


def parse_line(line: str) -> Event:
    """Classify one line of modem output (without line terminators)."""
    text = line.strip()
    upper = text.upper()
    if upper.isdigit():
        number = int(upper)
        if number in _CODE_OF_NUMBER:
            return Result(_CODE_OF_NUMBER[number], text=text)
        if number in CONNECT_RATE_CODES:
            return Result(ResultCode.CONNECT, rate=CONNECT_RATE_CODES[number], text=text)
        return Info(text)
    match = _CONNECT_RE.match(text)
    if match:
        rate = int(match.group(1)) if match.group(1) else None
        protocol = tuple(p for p in re.split(r"[/\s]+", match.group(2)) if p)
        if rate is not None or not match.group(2) or match.group(2)[0] in " /":
            return Result(ResultCode.CONNECT, rate=rate, protocol=protocol, text=text)
    upper = " ".join(upper.split())
    if upper in _ALIASES:
        return Result(_ALIASES[upper], text=text)
    try:
        return Result(ResultCode(upper), text=text)
    except ValueError:
        return Info(text)


class ResultParser:
    """Bytes from the modem in, events out.  Stops at CONNECT: what follows is data.

    Both terminators are accepted on their own because numeric results end with a bare
    CR while verbose ones are framed by CR LF.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.online = False
        #: Bytes received after the CONNECT line (the start of the remote's data).
        self.trailing = bytearray()
        self._lf_may_follow = False

    def feed(self, data: bytes) -> list[Event]:
        if self.online:
            if self._lf_may_follow and data:
                # The LF completing CONNECT's CR LF arrived in a later read: framing, not data.
                self._lf_may_follow = False
                if data[:1] == LF:
                    data = data[1:]
            self.trailing += data
            return []
        self._buffer += data
        events: list[Event] = []
        while not self.online:
            cut = _first_terminator(self._buffer)
            if cut < 0:
                break
            raw = bytes(self._buffer[:cut])
            ended_with_cr = self._buffer[cut] == CR[0]
            del self._buffer[:cut + 1]
            line = raw.decode("ascii", "replace").strip()
            if not line:
                continue
            event = parse_line(line)
            events.append(event)
            if isinstance(event, Result) and event.code is ResultCode.CONNECT:
                self.online = True
                # An LF completing the CONNECT line's CR LF is framing, not data (after a
                # line ended by LF alone, an LF is the remote's first byte).
                if ended_with_cr and self._buffer[:1] == LF:
                    del self._buffer[:1]
                elif not self._buffer and ended_with_cr:
                    self._lf_may_follow = True
                self.trailing += self._buffer
                self._buffer.clear()
        return events

    def back_to_command_state(self) -> None:
        self.online = False
        self._lf_may_follow = False
        self.trailing.clear()
        self._buffer.clear()

    @property
    def pending(self) -> bytes:
        """An unterminated partial line (e.g. a prompt) still in the buffer."""
        return bytes(self._buffer)


def _first_terminator(buffer: bytearray) -> int:
    positions = [p for p in (buffer.find(CR), buffer.find(LF)) if p >= 0]
    return min(positions) if positions else -1


def format_result(result: Result, verbose: bool) -> bytes:
    """How a modem sends ``result`` in the current V mode."""
    if verbose:
        if result.code is ResultCode.CONNECT:
            text = "CONNECT"
            if result.rate:
                text += f" {result.rate}"
            if result.protocol:
                text += "/" + "/".join(result.protocol)
        else:
            text = result.code.value
        return b"\r\n" + text.encode("ascii") + b"\r\n"
    if result.code is ResultCode.CONNECT and result.rate in _RATE_CODE_OF:
        number = _RATE_CODE_OF[result.rate]
    else:
        number = result.code.numeric if result.code.numeric is not None else ResultCode.ERROR.numeric
    return f"{number}\r".encode("ascii")


# --- commands (what the DTE sends) -------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command out of an AT command line: ``name`` such as ``D``, ``&F``, ``S``, ``+FCLASS``."""

    name: str
    arg: str = ""


class CommandSyntaxError(ValueError):
    pass


_BASIC_WITH_NUMBER = set("ABEHILMNOPQTVWXYZ")


def parse_command_line(line: str) -> list[Command]:
    """Split the part after ``AT`` into commands, as a modem's command interpreter does.

    Spaces are ignored outside the dial string.  ``D`` takes the rest of the line.
    """
    commands: list[Command] = []
    text = line
    i = 0
    n = len(text)
    while i < n:
        ch = text[i].upper()
        if ch == " ":
            i += 1
            continue
        if ch == "D":
            commands.append(Command("D", text[i + 1:].strip()))
            break
        if ch in "&\\%*#":
            if i + 1 >= n:
                raise CommandSyntaxError(line)
            name = ch + text[i + 1].upper()
            i += 2
            j = i
            while j < n and text[j].isdigit():
                j += 1
            commands.append(Command(name, text[i:j]))
            i = j
            continue
        if ch == "+":
            # Extended syntax runs to the next ';' (or the end of the line).
            j = text.find(";", i)
            body = text[i:] if j < 0 else text[i:j]
            m = re.match(r"\+([A-Za-z0-9]+)(.*)$", body.strip())
            if not m:
                raise CommandSyntaxError(line)
            commands.append(Command("+" + m.group(1).upper(), m.group(2).strip()))
            i = n if j < 0 else j + 1
            continue
        if ch == "S":
            m = re.match(r"S(\d+)(=\d*|\?)?", text[i:], re.IGNORECASE)
            if not m:
                raise CommandSyntaxError(line)
            commands.append(Command("S", m.group(1) + (m.group(2) or "")))
            i += m.end()
            continue
        if ch in _BASIC_WITH_NUMBER:
            j = i + 1
            while j < n and text[j].isdigit():
                j += 1
            commands.append(Command(ch, text[i + 1:j]))
            i = j
            continue
        raise CommandSyntaxError(line)
    return commands


def dial_command(number: str, method: str = "tone") -> str:
    return ("ATDT" if method == "tone" else "ATDP") + number


# --- the dial / redial state machine ------------------------------------------------

# Events (what happened), each stamped with the caller's clock reading ``at``.


@dataclass(frozen=True)
class Started:
    at: float


@dataclass(frozen=True)
class Reply:
    result: Result
    at: float


@dataclass(frozen=True)
class TimedOut:
    at: float


@dataclass(frozen=True)
class Paused:
    at: float


DialEvent = Started | Reply | TimedOut | Paused

# Actions (what the I/O shell must do next).


@dataclass(frozen=True)
class SendCommand:
    """Write ``command`` + CR and report the next final result, or ``TimedOut`` after ``timeout``."""

    command: str
    timeout: float


@dataclass(frozen=True)
class AbortDial:
    """The modem is still dialling: send any character to abort, report its result or TimedOut."""

    timeout: float


@dataclass(frozen=True)
class Pause:
    seconds: float
    reason: str


@dataclass(frozen=True)
class Connected:
    result: Result
    number: str
    attempt: int


@dataclass(frozen=True)
class Failure:
    """One attempt that did not connect, in words a user understands."""

    number: str
    attempt: int
    code: ResultCode | None  # None = the modem said nothing in time
    explanation: str


@dataclass(frozen=True)
class GaveUp:
    reason: str
    failures: tuple[Failure, ...]


DialAction = SendCommand | AbortDial | Pause | Connected | GaveUp


@dataclass(frozen=True)
class DialPlan:
    numbers: tuple[str, ...]
    init: tuple[str, ...] = DEFAULT_INIT
    dial_method: str = "tone"  # tone | pulse
    attempts_per_number: int = 3
    redial_delay: float = 30.0
    give_up_after: float | None = 600.0
    connect_timeout: float = 60.0
    command_timeout: float = 5.0


def explain(code: ResultCode | None, number: str, timeout: float | None = None) -> str:
    """A failed dial attempt in plain words (the session log and the CLI show these)."""
    if code is ResultCode.BUSY:
        return f"{number} was busy"
    if code is ResultCode.NO_ANSWER:
        return f"{number} rang but nobody answered"
    if code is ResultCode.NO_CARRIER:
        return (f"{number} answered but no modem connection was made "
                "(no carrier: a voice line, a fax, or a noisy line)")
    if code is ResultCode.NO_DIALTONE:
        return "no dial tone: is the phone cable plugged into the modem, and is the line free?"
    if code is ResultCode.ERROR:
        return f"the modem refused to dial {number!r} (ERROR): check the number and dial_method"
    if code is ResultCode.DELAYED:
        return f"the modem refuses to redial {number} yet (DELAYED by its country rules)"
    if code is ResultCode.BLACKLISTED:
        return f"the modem has blacklisted {number} after too many failed calls"
    if code is ResultCode.OK:
        return f"the modem returned to command mode without calling {number} (OK)"
    if code is None:
        wait = f" within {timeout:g} s" if timeout else ""
        return f"no connection to {number}{wait}: the modem gave no result"
    return f"{number}: {code.value}"


class Dialer:
    """Initialise the modem, then dial each number in order, round after round.

    A round dials every number once; a number is dialled at most
    ``attempts_per_number`` times.  The redial delay is waited before every round but
    the first, never between numbers of the same round: a busy first number should not
    delay trying the second.  A number the modem rejects with ERROR is not retried.
    ``give_up_after`` bounds the whole thing, measured from ``Started``.

    Drive it with ``start(at)`` and then ``handle(event)`` for each action's outcome;
    the shell reports only final results (it skips RING and other unsolicited lines).

    =======  ==============================  ==========================================
    phase    event                           action (next phase)
    =======  ==============================  ==========================================
    idle     Started                         SendCommand(init[0]) (init), or dial
    init     Reply OK                        next init string, or first dial (dial)
    init     Reply other / TimedOut          GaveUp, no failures: the modem is at fault
    dial     Reply CONNECT                   Connected (done)
    dial     Reply BUSY, NO ANSWER, ...      record Failure; next number, Pause before a
                                             new round (pause), or GaveUp (done)
    dial     TimedOut                        record Failure; AbortDial (abort)
    abort    any                             as after a failed dial
    pause    Paused                          SendCommand(ATDT next) (dial), or GaveUp
    =======  ==============================  ==========================================
    """

    def __init__(self, plan: DialPlan) -> None:
        if not plan.numbers:
            raise ValueError("a dial plan needs at least one number")
        self.plan = plan
        self.failures: list[Failure] = []
        self._started_at = 0.0
        self._init_index = 0
        self._queue: list[tuple[str, int]] = []
        self._round = 0
        self._refused: set[str] = set()
        self._current: tuple[str, int] | None = None
        self._phase = "idle"  # idle, init, dial, abort, pause, done
        self._final: DialAction | None = None

    # -- driving ---------------------------------------------------------------------

    def start(self, at: float) -> DialAction:
        return self.handle(Started(at))

    def handle(self, event: DialEvent) -> DialAction:
        if self._phase == "done":
            raise RuntimeError("the dialer has finished")
        handler = getattr(self, f"_on_{self._phase}")
        action = handler(event)
        if isinstance(action, (Connected, GaveUp)):
            self._phase = "done"
            self._final = action
        return action

    @property
    def current(self) -> tuple[str, int] | None:
        """The number being dialled and its attempt number (1-based)."""
        return self._current

    @property
    def finished(self) -> bool:
        return self._phase == "done"

    # -- phases ----------------------------------------------------------------------

    def _on_idle(self, event: DialEvent) -> DialAction:
        if not isinstance(event, Started):
            raise TypeError("start the dialer first")
        self._started_at = event.at
        self._phase = "init"
        if not self.plan.init:
            return self._next_dial(event.at)
        return SendCommand(self.plan.init[0], self.plan.command_timeout)

    def _on_init(self, event: DialEvent) -> DialAction:
        sent = self.plan.init[self._init_index]
        if isinstance(event, TimedOut):
            return GaveUp(f"the modem did not answer {sent!r} within {self.plan.command_timeout:g} s: "
                          "is it switched on, connected to this port, and set to the port's speed?", ())
        if isinstance(event, Reply) and event.result.code is ResultCode.OK:
            self._init_index += 1
            if self._init_index < len(self.plan.init):
                return SendCommand(self.plan.init[self._init_index], self.plan.command_timeout)
            return self._next_dial(event.at)
        if isinstance(event, Reply):
            return GaveUp(f"the modem rejected the init string {sent!r} ({event.result.code.value}): "
                          "check [link] init", ())
        raise RuntimeError(f"unexpected {event!r} while initialising")

    def _on_dial(self, event: DialEvent) -> DialAction:
        number, attempt = self._current  # type: ignore[misc]
        if isinstance(event, Reply):
            result = event.result
            if result.code is ResultCode.CONNECT:
                return Connected(result, number, attempt)
            if result.code is ResultCode.ERROR:
                self._refused.add(number)
            self.failures.append(Failure(number, attempt, result.code, explain(result.code, number)))
            return self._next_dial(event.at)
        if isinstance(event, TimedOut):
            self.failures.append(Failure(number, attempt, None,
                                         explain(None, number, self.plan.connect_timeout)))
            self._phase = "abort"
            return AbortDial(self.plan.command_timeout)
        raise RuntimeError(f"unexpected {event!r} while dialling")

    def _on_abort(self, event: DialEvent) -> DialAction:
        # Whatever the modem says to the abort (NO CARRIER, OK) or silence: move on.
        return self._next_dial(event.at)

    def _on_pause(self, event: DialEvent) -> DialAction:
        if not isinstance(event, Paused):
            raise TypeError(f"unexpected {event!r} while pausing")
        return self._dial_next_in_queue(event.at)

    # -- decisions -------------------------------------------------------------------

    def _next_dial(self, at: float) -> DialAction:
        if self._queue:
            return self._dial_next_in_queue(at)
        self._round += 1
        if self._round > self.plan.attempts_per_number:
            return self._give_up(f"no connection after {self._count_attempts()}")
        self._queue = [(n, self._round) for n in self.plan.numbers if n not in self._refused]
        if not self._queue:
            return self._give_up("the modem refused every number")
        if self._round == 1:
            return self._dial_next_in_queue(at)
        if self._out_of_time(at + self.plan.redial_delay):
            return self._give_up(f"giving up after {self._elapsed(at)} (limit {self.plan.give_up_after:g} s)")
        self._phase = "pause"
        return Pause(self.plan.redial_delay, f"waiting {self.plan.redial_delay:g} s before redialling")

    def _dial_next_in_queue(self, at: float) -> DialAction:
        if self._out_of_time(at):
            return self._give_up(f"giving up after {self._elapsed(at)} (limit {self.plan.give_up_after:g} s)")
        number, attempt = self._queue.pop(0)
        self._current = (number, attempt)
        self._phase = "dial"
        return SendCommand(dial_command(number, self.plan.dial_method), self.plan.connect_timeout)

    def _out_of_time(self, at: float) -> bool:
        limit = self.plan.give_up_after
        return limit is not None and at - self._started_at >= limit

    def _elapsed(self, at: float) -> str:
        return f"{at - self._started_at:.0f} s"

    def _count_attempts(self) -> str:
        numbers = len(self.plan.numbers)
        tries = len(self.failures)
        return f"{tries} attempt{'s' if tries != 1 else ''} on {numbers} number{'s' if numbers != 1 else ''}"

    def _give_up(self, headline: str) -> GaveUp:
        return GaveUp(f"{headline}: {summarise(self.failures)}" if self.failures else headline,
                      tuple(self.failures))


def summarise(failures: list[Failure] | tuple[Failure, ...]) -> str:
    """``0123 was busy (x3); 0456 rang but nobody answered`` — repeats folded."""
    counts: dict[str, int] = {}
    for failure in failures:
        counts[failure.explanation] = counts.get(failure.explanation, 0) + 1
    return "; ".join(text if n == 1 else f"{text} (x{n})" for text, n in counts.items())
