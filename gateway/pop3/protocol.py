"""The POP3 dialogue as a sans-IO state machine: bytes in, actions out.

RFC 1939 (USER PASS STAT LIST RETR DELE NOOP RSET QUIT TOP UIDL), RFC 2449 (CAPA and
response codes), RFC 5034 (AUTH PLAIN) and RFC 2595 (STLS).  The machine never
touches a socket, a file or a clock: whatever needs one is handed to the shell as an
action, and the shell reports the outcome back through one named method.

    state           command             -> actions                      shell reports
    AUTHORIZATION   USER / PASS         -> Authenticate                 login_accepted / login_refused
                    AUTH PLAIN [resp]   -> (AUTH_PLAIN) -> Authenticate
                    STLS                -> Send +OK, StartTLS           tls_started
    TRANSACTION     RETR / TOP          -> Stream (+OK line and body)
                    QUIT                -> Update(deleted)              update_finished
    any             CAPA NOOP ...       -> Send
    -               end of dialogue     -> Close

While the machine waits for a report it parks the rest of the input, so pipelined
commands run strictly in order.  Deletions are only marks until the Update at QUIT;
a session that ends any other way deletes nothing.
"""
from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

MAX_LINE = 4096  # RFC 2449 allows 255 octets per command; AUTH responses may be longer


NOOP_LIMIT = 100  # NOOPs one session may send (SMTP's junk command limit, for POP3)


class Response:
    """Every reply the server sends, named once; tests import the same names."""
    GREETING = "+OK dialmail POP3 server ready"
    CAPA = "+OK Capability list follows"
    USER_OK = "+OK Send your password"
    LOGGED_IN = "+OK Logged in: {count} messages ({octets} octets)"
    AUTH_FAILED = "-ERR [AUTH] Authentication failed"
    LOCKED_OUT = "-ERR [AUTH] Too many failed logins from your address, try again later"
    PLAINTEXT_REFUSED = "-ERR [AUTH] Plain-text authentication is only allowed after STLS"
    IN_USE = "-ERR [IN-USE] Mailbox is already in use by another session"
    MAILDROP_FAILED = "-ERR [SYS/TEMP] Mailbox cannot be opened, try again later"
    NEED_USER = "-ERR Send USER first"
    AUTH_CONTINUE = "+ "
    AUTH_MECHANISMS = "+OK Mechanisms follow"
    AUTH_UNSUPPORTED = "-ERR Unsupported authentication mechanism"
    AUTH_CANCELLED = "-ERR Authentication cancelled"
    AUTH_MALFORMED = "-ERR Malformed authentication response"
    STLS_OK = "+OK Begin TLS negotiation"
    STLS_UNAVAILABLE = "-ERR STLS is not available"
    STLS_ACTIVE = "-ERR TLS is already active"
    STAT = "+OK {count} {octets}"
    LIST_ONE = "+OK {number} {octets}"
    LIST_ALL = "+OK {count} messages ({octets} octets)"
    UIDL_ONE = "+OK {number} {uid}"
    UIDL_ALL = "+OK Unique-ID listing follows"
    RETR = "+OK {octets} octets"
    TOP = "+OK Top of message follows"
    MESSAGE_GONE = "-ERR [SYS/TEMP] Message is no longer available"
    DELE = "+OK Message {number} deleted"
    NO_SUCH_MESSAGE = "-ERR No such message"
    ALREADY_DELETED = "-ERR Message {number} already deleted"
    NOOP = "+OK"
    RSET = "+OK {count} messages ({octets} octets)"
    BYE = "+OK dialmail POP3 server signing off"
    BYE_UPDATED = "+OK dialmail POP3 server signing off ({deleted} deleted, {left} left)"
    UPDATE_FAILED = "-ERR [SYS/TEMP] Some deleted messages were not removed"
    SYNTAX = "-ERR Syntax error"
    UNKNOWN = "-ERR Unknown command"
    WRONG_STATE = "-ERR Command not valid in this state"
    LINE_TOO_LONG = "-ERR Line too long"
    IDLE_TIMEOUT = "-ERR Disconnected for inactivity"
    SHUTDOWN = "-ERR [SYS/TEMP] Server shutting down, try again later"
    TOO_MANY_NOOPS = "-ERR [SYS/TEMP] Too many NOOP commands, closing connection"


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    AUTH_PLAIN = "auth-plain"  # waiting for the SASL PLAIN response line
    CHECKING = "checking"  # waiting for login_accepted / login_refused
    STARTING_TLS = "starting-tls"  # waiting for tls_started
    TRANSACTION = "transaction"
    UPDATE = "update"  # waiting for update_finished
    CLOSED = "closed"


class Message(Protocol):
    """What the dialogue needs to know of a message in the maildrop."""
    uid: str
    octets: int


# ---------------------------------------------------------------- actions for the shell


@dataclass(frozen=True)
class Send:
    data: bytes


@dataclass(frozen=True)
class Authenticate:
    """Check the password, lock and open the maildrop; report the outcome."""
    user: str
    password: str = field(repr=False)
    mechanism: str  # USER or PLAIN, for the log


@dataclass(frozen=True)
class Stream:
    """Open the message; send ``head`` and the encoded message (``body_lines`` for TOP)."""
    message: Message
    head: bytes
    body_lines: int | None


@dataclass(frozen=True)
class StartTLS:
    pass


@dataclass(frozen=True)
class Update:
    """QUIT in TRANSACTION: remove ``deleted``, release the maildrop, report the outcome."""
    deleted: tuple[Message, ...]
    left: int


@dataclass(frozen=True)
class Close:
    pass


Action = Send | Authenticate | Stream | StartTLS | Update | Close


def line(text: str) -> bytes:
    return text.encode("utf-8") + b"\r\n"


def multiline(first: str, lines: Sequence[str]) -> bytes:
    """A multi-line response; its lines never start with a dot, so none needs stuffing."""
    return b"".join(line(t) for t in (first, *lines, "."))


class Session:
    """One POP3 connection's dialogue.

    ``tls_available``: STLS may be offered.  ``plaintext_allowed``: a password may be
    sent in the clear (loopback, or the LAN when the configuration allows it); after
    STLS it always may.
    """

    def __init__(self, tls_available: bool = False, plaintext_allowed: bool = True, secure: bool = False):
        self.tls_available = tls_available
        self.secure = secure
        self._plaintext_allowed = plaintext_allowed
        self.state = State.AUTHORIZATION
        self.user: str | None = None
        self.messages: tuple[Message, ...] = ()
        self.deleted: set[int] = set()  # 0-based indexes marked by DELE
        self.retrieved = 0
        self.noops = 0
        self._inbox = bytearray()
        self._out: list[Action] = []

    # ------------------------------------------------------------ feeding and draining

    def greeting(self) -> bytes:
        return line(Response.GREETING)

    def receive_data(self, data: bytes) -> None:
        if self.state is not State.CLOSED:
            self._inbox += data

    def next_action(self) -> Action | None:
        """The next thing the shell must do, or None when it must read more input."""
        while not self._out:
            if self.state in (State.CHECKING, State.STARTING_TLS, State.UPDATE, State.CLOSED):
                return None
            end = self._inbox.find(b"\n")
            if end < 0:
                if len(self._inbox) > MAX_LINE:
                    self._close(Response.LINE_TOO_LONG)
                    continue
                return None
            raw = bytes(self._inbox[:end + 1])
            del self._inbox[:end + 1]
            if len(raw) > MAX_LINE:
                self._reply(Response.LINE_TOO_LONG)
                continue
            self._dispatch(raw.rstrip(b"\r\n").decode("utf-8", "replace"))
        return self._out.pop(0)

    @property
    def plaintext_allowed(self) -> bool:
        return self.secure or self._plaintext_allowed

    # ------------------------------------------------------------ reports from the shell

    def login_accepted(self, messages: Sequence[Message]) -> None:
        self._expect(State.CHECKING)
        self.messages = tuple(messages)
        self.deleted.clear()
        self.state = State.TRANSACTION
        self._reply(Response.LOGGED_IN, count=len(self.messages), octets=self._octets())

    def login_refused(self, response: str) -> None:
        """``response`` is one of AUTH_FAILED, LOCKED_OUT, IN_USE, MAILDROP_FAILED."""
        self._expect(State.CHECKING)
        self.user = None
        self.state = State.AUTHORIZATION
        self._reply(response)

    def tls_started(self) -> None:
        self._expect(State.STARTING_TLS)
        self.secure = True
        self.state = State.AUTHORIZATION

    def update_finished(self, failed: int = 0) -> None:
        self._expect(State.UPDATE)
        if failed:
            self._close(Response.UPDATE_FAILED)
        else:
            self._close(Response.BYE_UPDATED, deleted=len(self.deleted),
                        left=len(self.messages) - len(self.deleted))

    def shutdown(self) -> None:
        """The server is stopping: say so and end without an UPDATE."""
        if self.state is not State.CLOSED:
            self._close(Response.SHUTDOWN)

    def idle_timeout(self) -> None:
        if self.state is not State.CLOSED:
            self._close(Response.IDLE_TIMEOUT)

    # ------------------------------------------------------------ commands

    def _dispatch(self, text: str) -> None:
        if self.state is State.AUTH_PLAIN:
            self._auth_plain_response(text)
            return
        keyword, _, arg = text.partition(" ")
        handler = self._COMMANDS.get(keyword.upper())
        if handler is None:
            self._reply(Response.UNKNOWN)
            return
        states, method = handler
        if self.state not in states:
            self._reply(Response.WRONG_STATE)
            return
        method(self, arg)

    def _capa(self, arg: str) -> None:
        caps = ["CAPA", "TOP", "UIDL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"]
        if self.state is State.AUTHORIZATION:
            if self.plaintext_allowed:
                caps += ["USER", "SASL PLAIN"]
            if self.tls_available and not self.secure:
                caps.append("STLS")
        caps.append("IMPLEMENTATION dialmail")
        self._send(multiline(Response.CAPA, caps))

    def _user(self, arg: str) -> None:
        if not self.plaintext_allowed:
            self._reply(Response.PLAINTEXT_REFUSED)
        elif not arg.strip():
            self._reply(Response.SYNTAX)
        else:
            self.user = arg.strip()
            self._reply(Response.USER_OK)

    def _pass(self, arg: str) -> None:
        if not self.plaintext_allowed:
            self._reply(Response.PLAINTEXT_REFUSED)
        elif self.user is None:
            self._reply(Response.NEED_USER)
        else:
            # RFC 1939: the password is the rest of the line and may contain spaces.
            self._authenticate(self.user, arg, "USER")

    def _auth(self, arg: str) -> None:
        mechanism, _, initial = arg.strip().partition(" ")
        if not mechanism:
            self._send(multiline(Response.AUTH_MECHANISMS, ["PLAIN"] if self.plaintext_allowed else []))
        elif mechanism.upper() != "PLAIN":
            self._reply(Response.AUTH_UNSUPPORTED)
        elif not self.plaintext_allowed:
            self._reply(Response.PLAINTEXT_REFUSED)
        elif initial:
            self._auth_plain_response("" if initial.strip() == "=" else initial.strip())
        else:
            self.state = State.AUTH_PLAIN
            self._reply(Response.AUTH_CONTINUE)

    def _auth_plain_response(self, text: str) -> None:
        self.state = State.AUTHORIZATION
        if text.strip() == "*":
            self._reply(Response.AUTH_CANCELLED)
            return
        try:
            authzid, authcid, password = base64.b64decode(text.strip(), validate=True).decode("utf-8").split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self._reply(Response.AUTH_MALFORMED)
            return
        if authzid and authzid.lower() != authcid.lower():
            self._reply(Response.AUTH_FAILED)  # acting for another user is not offered
            return
        self._authenticate(authcid, password, "PLAIN")

    def _authenticate(self, user: str, password: str, mechanism: str) -> None:
        self.user = user
        self.state = State.CHECKING
        self._out.append(Authenticate(user, password, mechanism))

    def _stls(self, arg: str) -> None:
        if self.secure:
            self._reply(Response.STLS_ACTIVE)
        elif not self.tls_available:
            self._reply(Response.STLS_UNAVAILABLE)
        else:
            # Anything the client pipelined behind STLS was sent in the clear: drop it.
            self._inbox.clear()
            self._reply(Response.STLS_OK)
            self.state = State.STARTING_TLS
            self._out.append(StartTLS())

    def _quit(self, arg: str) -> None:
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE
            self._out.append(Update(tuple(self.messages[i] for i in sorted(self.deleted)),
                                    left=len(self.messages) - len(self.deleted)))
        else:
            self._close(Response.BYE)

    def _noop(self, arg: str) -> None:
        # NOOP keeps the autologout timer from firing: without a limit a client could
        # hold a connection (and the maildrop lock) for ever.
        self.noops += 1
        if self.noops > NOOP_LIMIT:
            self._close(Response.TOO_MANY_NOOPS)
        else:
            self._reply(Response.NOOP)

    def _stat(self, arg: str) -> None:
        self._reply(Response.STAT, count=len(self.messages) - len(self.deleted), octets=self._octets())

    def _list(self, arg: str) -> None:
        if arg.strip():
            if (i := self._message_arg(arg)) is not None:
                self._reply(Response.LIST_ONE, number=i + 1, octets=self.messages[i].octets)
            return
        live = [(i, m) for i, m in enumerate(self.messages) if i not in self.deleted]
        self._send(multiline(Response.LIST_ALL.format(count=len(live), octets=self._octets()),
                             [f"{i + 1} {m.octets}" for i, m in live]))

    def _uidl(self, arg: str) -> None:
        if arg.strip():
            if (i := self._message_arg(arg)) is not None:
                self._reply(Response.UIDL_ONE, number=i + 1, uid=self.messages[i].uid)
            return
        self._send(multiline(Response.UIDL_ALL, [f"{i + 1} {m.uid}" for i, m in enumerate(self.messages)
                                                 if i not in self.deleted]))

    def _retr(self, arg: str) -> None:
        if (i := self._message_arg(arg)) is not None:
            message = self.messages[i]
            self.retrieved += 1
            self._out.append(Stream(message, line(Response.RETR.format(octets=message.octets)), None))

    def _top(self, arg: str) -> None:
        parts = arg.split()
        if len(parts) != 2 or not parts[1].isdigit():
            self._reply(Response.SYNTAX)
            return
        if (i := self._message_arg(parts[0])) is not None:
            self._out.append(Stream(self.messages[i], line(Response.TOP), int(parts[1])))

    def _dele(self, arg: str) -> None:
        if (i := self._message_arg(arg)) is not None:
            self.deleted.add(i)
            self._reply(Response.DELE, number=i + 1)

    def _rset(self, arg: str) -> None:
        self.deleted.clear()
        self._reply(Response.RSET, count=len(self.messages), octets=self._octets())

    _AUTH = (State.AUTHORIZATION,)
    _TRANS = (State.TRANSACTION,)
    _BOTH = (State.AUTHORIZATION, State.TRANSACTION)
    _COMMANDS: ClassVar[dict] = {
        "CAPA": (_BOTH, _capa), "QUIT": (_BOTH, _quit), "NOOP": (_TRANS, _noop),
        "USER": (_AUTH, _user), "PASS": (_AUTH, _pass), "AUTH": (_AUTH, _auth), "STLS": (_AUTH, _stls),
        "STAT": (_TRANS, _stat), "LIST": (_TRANS, _list), "UIDL": (_TRANS, _uidl), "RETR": (_TRANS, _retr),
        "TOP": (_TRANS, _top), "DELE": (_TRANS, _dele), "RSET": (_TRANS, _rset),
    }

    # ------------------------------------------------------------ plumbing

    def _message_arg(self, arg: str) -> int | None:
        """The 0-based index named by a message-number argument, or None after an -ERR."""
        text = arg.strip()
        if not text.isdigit() or not text.isascii():
            self._reply(Response.SYNTAX)
            return None
        i = int(text) - 1
        if not 0 <= i < len(self.messages):
            self._reply(Response.NO_SUCH_MESSAGE)
            return None
        if i in self.deleted:
            self._reply(Response.ALREADY_DELETED, number=i + 1)
            return None
        return i

    def _octets(self) -> int:
        return sum(m.octets for i, m in enumerate(self.messages) if i not in self.deleted)

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise RuntimeError(f"report in state {self.state.value}, expected {state.value}")

    def _reply(self, response: str, **values) -> None:
        self._send(line(response.format(**values) if values else response))

    def _send(self, data: bytes) -> None:
        self._out.append(Send(data))

    def _close(self, response: str, **values) -> None:
        self._reply(response, **values)
        self._out.append(Close())
        self.state = State.CLOSED
        self._inbox.clear()
