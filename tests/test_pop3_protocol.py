"""The POP3 dialogue, the wire encoding and the login throttle, in memory (no sockets)."""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.throttle import MAX_DELAY, LoginThrottle
from gateway.pop3.protocol import (
    MAX_LINE,
    Authenticate,
    Close,
    Response,
    Send,
    Session,
    StartTLS,
    State,
    Stream,
    Update,
)
from gateway.pop3.wire import MessageEncoder, scan, wire_octets


@dataclass(frozen=True)
class Msg:
    uid: str
    data: bytes

    @property
    def octets(self) -> int:
        return wire_octets(io.BytesIO(self.data))


MAILDROP = [Msg("1700000001.A.host", b"Subject: one\r\n\r\nfirst\r\n"),
            Msg("1700000002.B.host", b"Subject: two\n\n.dot line\nsecond\nthird\n")]


class Shell:
    """Plays the shell's part in memory: passwords, the maildrop, TLS, UPDATE."""

    def __init__(self, session: Session, passwords=None, refuse: str | None = None):
        self.session = session
        self.passwords = passwords if passwords is not None else {"alice": "pw"}
        self.refuse = refuse
        self.updates: list[Update] = []
        self.logins: list[Authenticate] = []
        self.closed = False

    def say(self, text: str | bytes) -> bytes:
        data = text if isinstance(text, bytes) else text.encode() + b"\r\n"
        self.session.receive_data(data)
        out = b""
        while (action := self.session.next_action()) is not None:
            if isinstance(action, Send):
                out += action.data
            elif isinstance(action, Authenticate):
                self.logins.append(action)
                if self.refuse:
                    self.session.login_refused(self.refuse)
                elif self.passwords.get(action.user) == action.password:
                    self.session.login_accepted(MAILDROP)
                else:
                    self.session.login_refused(Response.AUTH_FAILED)
            elif isinstance(action, Stream):
                enc = MessageEncoder(action.body_lines)
                out += action.head + enc.encode(action.message.data) + enc.end()
            elif isinstance(action, StartTLS):
                self.session.tls_started()
            elif isinstance(action, Update):
                self.updates.append(action)
                self.session.update_finished()
            elif isinstance(action, Close):
                self.closed = True
        return out


def logged_in(**kw) -> Shell:
    shell = Shell(Session(**kw))
    shell.say("USER alice")
    assert shell.say("PASS pw") == b"+OK Logged in: 2 messages (65 octets)\r\n"
    return shell


def test_user_pass_login_then_stat_list_uidl():
    shell = logged_in()
    one, two = (m.octets for m in MAILDROP)
    assert shell.say("STAT") == b"+OK 2 65\r\n"
    assert shell.say("LIST") == b"+OK 2 messages (65 octets)\r\n1 23\r\n2 42\r\n.\r\n"
    assert shell.say("LIST 2") == b"+OK 2 42\r\n"
    assert shell.say("UIDL") == b"+OK Unique-ID listing follows\r\n1 1700000001.A.host\r\n2 1700000002.B.host\r\n.\r\n"
    assert shell.say("uidl 1") == b"+OK 1 1700000001.A.host\r\n"


def test_octets_count_crlf_line_ends_of_lf_only_files():
    assert MAILDROP[1].octets == len(MAILDROP[1].data.replace(b"\n", b"\r\n"))


def test_retr_sends_crlf_dot_stuffed_message_and_terminator():
    shell = logged_in()
    assert shell.say("RETR 2") == b"+OK 42 octets\r\n" \
        b"Subject: two\r\n\r\n..dot line\r\nsecond\r\nthird\r\n.\r\n"


def test_top_sends_header_blank_line_and_n_body_lines():
    shell = logged_in()
    assert shell.say("TOP 2 1") == b"+OK Top of message follows\r\nSubject: two\r\n\r\n..dot line\r\n.\r\n"
    assert shell.say("TOP 2 0") == b"+OK Top of message follows\r\nSubject: two\r\n\r\n.\r\n"
    assert shell.say("TOP 2 99") == b"+OK Top of message follows\r\nSubject: two\r\n\r\n..dot line\r\nsecond\r\nthird\r\n.\r\n"
    assert shell.say("TOP 2") == b"-ERR Syntax error\r\n"


def test_deletions_take_effect_only_in_update_at_quit():
    shell = logged_in()
    assert shell.say("DELE 1") == b"+OK Message 1 deleted\r\n"
    assert shell.say("DELE 1") == b"-ERR Message 1 already deleted\r\n"
    assert shell.say("RETR 1") == b"-ERR Message 1 already deleted\r\n"
    assert shell.say("STAT") == b"+OK 1 42\r\n"
    assert shell.say("UIDL") == b"+OK Unique-ID listing follows\r\n2 1700000002.B.host\r\n.\r\n"
    assert shell.updates == []
    assert shell.say("QUIT") == b"+OK dialmail POP3 server signing off (1 deleted, 1 left)\r\n"
    assert shell.closed
    assert [m.uid for m in shell.updates[0].deleted] == ["1700000001.A.host"]


def test_rset_undeletes():
    shell = logged_in()
    shell.say("DELE 2")
    assert shell.say("RSET") == b"+OK 2 messages (65 octets)\r\n"
    shell.say("QUIT")
    assert shell.updates[0].deleted == ()


def test_a_session_that_just_ends_has_no_update():
    shell = logged_in()
    shell.say("DELE 1")
    shell.session.idle_timeout()
    assert shell.say(b"") == b"-ERR Disconnected for inactivity\r\n"
    assert shell.closed and shell.updates == []


def test_bad_password_returns_to_authorization_with_auth_code():
    shell = Shell(Session())
    assert shell.say("USER alice") == b"+OK Send your password\r\n"
    assert shell.say("PASS wrong") == b"-ERR [AUTH] Authentication failed\r\n"
    assert shell.session.state is State.AUTHORIZATION
    assert shell.say("PASS pw") == b"-ERR Send USER first\r\n"
    assert shell.say("STAT") == b"-ERR Command not valid in this state\r\n"


def test_password_may_contain_spaces_and_is_not_in_repr():
    shell = Shell(Session(), passwords={"alice": "two words "})
    shell.say("USER alice")
    assert shell.say("PASS two words ").startswith(b"+OK")
    assert "two words" not in repr(shell.logins[0])


def test_in_use_refusal_is_passed_through():
    shell = Shell(Session(), refuse=Response.IN_USE)
    shell.say("USER alice")
    assert shell.say("PASS pw") == b"-ERR [IN-USE] Mailbox is already in use by another session\r\n"


def test_auth_plain_with_initial_response_and_continuation():
    token = base64.b64encode(b"\0alice\0pw").decode()
    shell = Shell(Session())
    assert shell.say(f"AUTH PLAIN {token}").startswith(b"+OK Logged in")
    shell = Shell(Session())
    assert shell.say("AUTH PLAIN") == b"+ \r\n"
    assert shell.say(token).startswith(b"+OK Logged in")
    assert shell.logins[0].mechanism == "PLAIN"


def test_auth_plain_cancel_malformed_and_foreign_authzid():
    shell = Shell(Session())
    shell.say("AUTH PLAIN")
    assert shell.say("*") == b"-ERR Authentication cancelled\r\n"
    assert shell.say("AUTH PLAIN !!!") == b"-ERR Malformed authentication response\r\n"
    other = base64.b64encode(b"bob\0alice\0pw").decode()
    assert shell.say(f"AUTH PLAIN {other}") == b"-ERR [AUTH] Authentication failed\r\n"
    assert shell.say("AUTH CRAM-MD5") == b"-ERR Unsupported authentication mechanism\r\n"
    assert shell.say("AUTH") == b"+OK Mechanisms follow\r\nPLAIN\r\n.\r\n"


def test_capa_names_extensions_and_stls_only_when_a_cert_is_configured():
    caps = Shell(Session()).say("CAPA")
    assert caps.startswith(b"+OK Capability list follows\r\n") and caps.endswith(b"\r\n.\r\n")
    for cap in (b"TOP", b"UIDL", b"USER", b"PIPELINING", b"RESP-CODES", b"AUTH-RESP-CODE", b"SASL PLAIN",
                b"IMPLEMENTATION dialmail"):
        assert b"\r\n" + cap + b"\r\n" in caps
    assert b"STLS" not in caps
    assert b"\r\nSTLS\r\n" in Shell(Session(tls_available=True)).say("CAPA")
    assert Shell(Session()).say("STLS") == b"-ERR STLS is not available\r\n"


def test_plaintext_login_refused_off_loopback_until_stls():
    shell = Shell(Session(tls_available=True, plaintext_allowed=False))
    caps = shell.say("CAPA")
    assert b"USER" not in caps and b"SASL" not in caps
    assert shell.say("USER alice") == b"-ERR [AUTH] Plain-text authentication is only allowed after STLS\r\n"
    assert shell.say("AUTH PLAIN AGFsaWNlAHB3") == b"-ERR [AUTH] Plain-text authentication is only allowed after STLS\r\n"
    assert shell.say("STLS") == b"+OK Begin TLS negotiation\r\n"
    assert shell.session.secure
    assert b"\r\nUSER\r\n" in shell.say("CAPA")
    shell.say("USER alice")
    assert shell.say("PASS pw").startswith(b"+OK")


def test_input_pipelined_behind_stls_is_discarded():
    shell = Shell(Session(tls_available=True, plaintext_allowed=False))
    out = shell.say(b"STLS\r\nUSER alice\r\nPASS pw\r\n")
    assert out == b"+OK Begin TLS negotiation\r\n"
    assert shell.logins == []


def test_pipelined_commands_answer_in_order():
    shell = Shell(Session())
    out = shell.say(b"USER alice\r\nPASS pw\r\nSTAT\r\nRETR 1\r\nNOOP\r\nQUIT\r\n")
    assert out.split(b"\r\n")[0] == b"+OK Send your password"
    assert out.index(b"+OK Logged in") < out.index(b"+OK 2 ") < out.index(b"first\r\n.\r\n") < \
        out.index(b"+OK\r\n") < out.index(b"signing off")


def test_message_numbers_are_checked():
    shell = logged_in()
    assert shell.say("RETR 3") == b"-ERR No such message\r\n"
    assert shell.say("RETR 0") == b"-ERR No such message\r\n"
    assert shell.say("RETR x") == b"-ERR Syntax error\r\n"
    assert shell.say("DELE -1") == b"-ERR Syntax error\r\n"
    assert shell.say("FOO") == b"-ERR Unknown command\r\n"
    assert shell.say("USER bob") == b"-ERR Command not valid in this state\r\n"


def test_overlong_line_ends_the_session():
    shell = Shell(Session())
    assert shell.say(b"X" * (MAX_LINE + 10)) == b"-ERR Line too long\r\n"
    assert shell.closed


def test_quit_in_authorization_closes_without_update():
    shell = Shell(Session())
    assert shell.say("QUIT") == b"+OK dialmail POP3 server signing off\r\n"
    assert shell.closed and shell.updates == []


# ---------------------------------------------------------------- the wire encoding


def unstuff(wire: bytes) -> bytes:
    assert wire.endswith(b".\r\n")
    lines = wire[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def normalise(data: bytes) -> bytes:
    text = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text + b"\r\n" if text and not text.endswith(b"\n") else text


message_bytes = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"x y", b"\n."]),
                         max_size=60).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(data=message_bytes, cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=8))
def test_encoder_output_unstuffs_to_crlf_message_whatever_the_chunking(data, cuts):
    enc, out, pos = MessageEncoder(), b"", 0
    for size in cuts:
        out += enc.encode(data[pos:pos + size])
        pos += size
    out += enc.encode(data[pos:]) + enc.end()
    # no line of the wire form is a lone dot before the terminator
    if data:
        assert b"\r\n.\r\n" not in out[:-3] and not out.startswith(b".\r\n")
    assert unstuff(out) == normalise(data)
    assert enc.octets == len(normalise(data)) == wire_octets(io.BytesIO(data), chunk=3)


@settings(max_examples=300, deadline=None)
@given(data=message_bytes)
def test_a_message_scanned_verbatim_is_sent_as_stored_and_the_shortcut_sends_the_same_bytes(data):
    octets, verbatim = scan(io.BytesIO(data), chunk=3)
    enc = MessageEncoder()
    full = enc.encode(data) + enc.end()
    assert octets == enc.octets
    assert verbatim == (full == data + b".\r\n")
    if verbatim:
        short = MessageEncoder(verbatim=True)
        assert short.encode(data[:5]) + short.encode(data[5:]) + short.end() == full


def test_scan_tells_which_stored_messages_need_no_encoding():
    assert scan(io.BytesIO(b"Subject: a\r\n\r\nbody\r\n")) == (20, True)
    assert scan(io.BytesIO(b"Subject: a\r\n\r\n.dot\r\n")) == (20, False)  # stuffed on the wire
    assert scan(io.BytesIO(b"Subject: a\n\nbody\n")) == (20, False)  # bare LF becomes CRLF
    assert scan(io.BytesIO(b"Subject: a\r\n\r\nbody")) == (20, False)  # a final CRLF is added
    # TOP never takes the shortcut: it must count the body's lines.
    top = MessageEncoder(body_lines=0, verbatim=True)
    assert top.encode(b"Subject: a\r\n\r\nbody\r\n") + top.end() == b"Subject: a\r\n\r\n.\r\n"


def test_bare_cr_is_content_not_a_line_end():
    enc = MessageEncoder()
    assert enc.encode(b"a\rb\r") + enc.encode(b"\nc") + enc.end() == b"a\rb\r\nc\r\n.\r\n"


# ---------------------------------------------------------------- the login throttle


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_repeated_failures_delay_more_then_lock_the_address_out():
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, lockout=60, clock=clock)
    delays = [throttle.failed("192.0.2.1") for _ in range(2)]
    assert 0 < delays[0] < delays[1]
    assert not throttle.locked_out("192.0.2.1")
    assert throttle.failed("192.0.2.1") == MAX_DELAY
    assert throttle.locked_out("192.0.2.1")
    assert not throttle.locked_out("192.0.2.2")
    clock.now += 61
    assert not throttle.locked_out("192.0.2.1")
    assert throttle.delay("192.0.2.1") == 0


def test_failures_outside_the_window_do_not_count_and_success_clears():
    clock = Clock()
    throttle = LoginThrottle(max_failures=2, lockout=60, clock=clock)
    throttle.failed("a")
    clock.now += 61
    throttle.failed("a")
    assert not throttle.locked_out("a")
    throttle.succeeded("a")
    throttle.failed("a")
    assert not throttle.locked_out("a")
