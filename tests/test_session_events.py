"""Session events on the control socket: each value becomes exactly the JSON line the daemon
has always sent (so a newer connect-now and an older daemon, or the other way round, still
understand each other), and that line becomes the same value again."""
import pytest

from gateway.control import HangupAsked, NoSession, Status, from_json, to_json
from gateway.session.events import (
    Connected,
    Dialing,
    Done,
    End,
    Error,
    Etrn,
    EtrnFailed,
    FetchDone,
    Fetched,
    FetchedPiece,
    Hangup,
    Hook,
    HungUp,
    Info,
    ModemLine,
    Refused,
    Retry,
    SendDone,
    Sent,
    Started,
    Stopping,
    Summary,
)

WIRE = [
    (Started(7, "manual", "both"), b'{"type": "session", "id": 7, "trigger": "manual", "mode": "both"}\n'),
    (Refused("a dial session is already running (pid 42)"),
     b'{"type": "refused", "reason": "a dial session is already running (pid 42)"}\n'),
    (Stopping("maximum session time reached"), b'{"type": "stopping", "reason": "maximum session time reached"}\n'),
    (Error("NO CARRIER"), b'{"type": "error", "message": "NO CARRIER"}\n'),
    (Info("a session is already running; following it"),
     b'{"type": "info", "message": "a session is already running; following it"}\n'),
    (Hook("before", "echo hi", 0, "hi\n"),
     b'{"type": "hook", "which": "before", "command": "echo hi", "status": 0, "output": "hi\\n"}\n'),
    (Dialing("sim"), b'{"type": "dialing", "backend": "sim"}\n'),
    (ModemLine("dialling 5550100 (attempt 1 of 3)"),
     b'{"type": "modem", "text": "dialling 5550100 (attempt 1 of 3)"}\n'),
    (Connected(33600, "sim 33600 bps ARQ/V34"),
     b'{"type": "connected", "rate": 33600, "description": "sim 33600 bps ARQ/V34"}\n'),
    (Connected(None, "always-on"), b'{"type": "connected", "rate": null, "description": "always-on"}\n'),
    (Hangup(), b'{"type": "hangup"}\n'),
    (HungUp("hung up by dropping DTR"), b'{"type": "hungup", "how": "hung up by dropping DTR"}\n'),
    (Etrn("office.test", 250, "Queuing started"),
     b'{"type": "etrn", "domain": "office.test", "code": 250, "reply": "Queuing started"}\n'),
    (EtrnFailed("Connection refused"), b'{"type": "etrn", "error": "Connection refused"}\n'),
    (Sent("1a2b", 2048, 4096, 1.25, 2, 3),
     b'{"type": "send", "qid": "1a2b", "size": 2048, "total": 4096, "seconds": 1.25, "done": 2, "left": 3}\n'),
    (Fetched("isp/INBOX/17", 3000, 9000, 3, 0),
     b'{"type": "fetch", "uid": "isp/INBOX/17", "size": 3000, "total": 9000, "done": 3, "left": 0}\n'),
    (FetchedPiece(17, 65536, 131072), b'{"type": "fetch-piece", "uid": 17, "size": 65536, "done_bytes": 131072}\n'),
    (SendDone(5, 1, 0, 10240, "send: 4.4.2 lost connection with the mail server (link went down)"),
     b'{"type": "send-done", "sent": 5, "deferred": 1, "bounced": 0, "bytes": 10240, '
     b'"error": "send: 4.4.2 lost connection with the mail server (link went down)"}\n'),
    (SendDone(5, 0, 0, 10240, None),
     b'{"type": "send-done", "sent": 5, "deferred": 0, "bounced": 0, "bytes": 10240, "error": null}\n'),
    (FetchDone(2, ("fetch: isp: login refused",)),
     b'{"type": "fetch-done", "fetched": 2, "errors": ["fetch: isp: login refused"]}\n'),
    (FetchDone(0, ()), b'{"type": "fetch-done", "fetched": 0, "errors": []}\n'),
    (Retry(30.0, 1, 3), b'{"type": "retry", "in": 30.0, "attempt": 1, "of": 3}\n'),
    (Done(7, "partial", Summary("manual", "send", "partial", 33600, 12.5, 3, 1, 0, 0, 5000, 800, 0.12,
                                ("carrier lost: NO CARRIER",))),
     b'{"type": "done", "id": 7, "outcome": "partial", "record": {"trigger": "manual", "mode": "send", '
     b'"outcome": "partial", "rate": 33600, "connected_seconds": 12.5, "sent": 3, "deferred": 1, "bounced": 0, '
     b'"fetched": 0, "bytes_up": 5000, "bytes_down": 800, "cost": 0.12, "errors": ["carrier lost: NO CARRIER"]}}\n'),
    (End("ok"), b'{"type": "end", "outcome": "ok"}\n'),
    (Status(4242, "idle", None, {"messages": 0, "bytes": 0}, "2030-01-01 08:00", None),
     b'{"type": "status", "pid": 4242, "link": "idle", "session": null, "queue": {"messages": 0, "bytes": 0}, '
     b'"next_dial": "2030-01-01 08:00", "last_session": null}\n'),
    (HangupAsked({"trigger": "manual", "mode": "both", "started": 1700000000.5}),
     b'{"type": "hangup-asked", "session": {"trigger": "manual", "mode": "both", "started": 1700000000.5}}\n'),
    (NoSession("no dial session is running"), b'{"type": "no-session", "message": "no dial session is running"}\n'),
]


@pytest.mark.parametrize("event, line", WIRE, ids=[f"{type(e).__name__}-{n}" for n, (e, _) in enumerate(WIRE)])
def test_event_is_the_same_json_line_both_ways(event, line):
    assert to_json(event) == line
    assert from_json(line) == event


def test_every_event_kind_has_a_wire_line_here():
    from gateway.session import events
    kinds = {cls for cls in vars(events).values()
             if isinstance(cls, type) and issubclass(cls, events.Event) and cls is not events.Event}
    assert kinds <= {type(e) for e, _ in WIRE}


def test_kind_this_side_does_not_know_is_skipped_and_extra_keys_ignored():
    # a newer daemon may send kinds and keys an older command line has never heard of
    assert from_json(b'{"type": "weather", "rain": true}\n') is None
    assert from_json(b'{"type": "end", "outcome": "ok", "seconds": 3}\n') == End("ok")
    assert from_json(b'{"type": "done", "id": 1, "outcome": "ok", "record": {"sent": 2, "carrier": 1}}\n') \
        == Done(1, "ok", Summary(sent=2))


def test_event_missing_a_key_is_refused_as_malformed():
    with pytest.raises(ValueError, match="malformed 'end' event"):
        from_json(b'{"type": "end"}\n')
