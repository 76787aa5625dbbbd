"""SMTP replies dialmail sends, named once; tests import the same names.

ENHANCEDSTATUSCODES is advertised, so every 2xx/4xx/5xx reply carries an RFC 3463 code
(RFC 2034 §3), except the greeting and the answers to HELO/EHLO.  Our own replies below
are written with theirs; aiosmtpd's are given one on their way out by ``with_status_code``.
"""
from __future__ import annotations

import re


class Reply:
    SENDER_OK = "250 2.1.0 Ok"
    RECIPIENT_OK = "250 2.1.5 Ok"
    DONE = "250 2.0.0 Ok"  # RSET, NOOP
    BYE = "221 2.0.0 Bye"
    QUEUED = "250 2.0.0 Ok: queued as {qid}"
    NO_SUCH_USER = "550 5.1.1 No such user here"
    RELAY_DENIED = "554 5.7.1 Relay access denied"
    BAD_ADDRESS = "553 5.1.3 Address not accepted: use a plain user@domain address"
    UTF8_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter on MAIL"
    UTF8_NO_ROUTE = "553 5.6.7 The smarthost cannot take non-ASCII addresses (no SMTPUTF8 on the way out)"
    TOO_BIG = "552 5.3.4 Message too big for this system (limit {limit} bytes)"
    TOO_MUCH_DATA = "552 5.3.4 Error: too much mail data"
    LINE_TOO_LONG = "500 5.5.2 Error: command line too long"
    NO_SPACE = "452 4.3.1 Insufficient system storage, try again later"
    LOCAL_ERROR = "451 4.3.0 Local error in processing, try again later"
    TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
    SENDER_BLOCKED = "550 5.7.1 Sender address rejected: blocked by local policy"
    VIRUS = "554 5.7.1 Message rejected: virus found ({name})"
    SCAN_FAILED = "451 4.7.1 Message could not be scanned for viruses, try again later"
    MEMBERS_ONLY = "550 5.7.1 Only members of this group may send to it"
    AUTH_LOCKED = "454 4.7.0 Too many failed logins from your address, try again later"
    AUTH_BAD_BASE64 = "501 5.5.2 Can't decode base64"
    BAD_HELO = "501 5.5.4 Invalid HELO/EHLO argument: control characters are not allowed"
    AUTH_BAD_PLAIN = "501 5.5.2 Can't split auth value"
    CONTENT_BLOCKED = "550 5.7.1 Message rejected: From address blocked by local policy"
    DATA_TIMEOUT = "421 4.4.2 {hostname} Error: timeout exceeded"
    TOO_MANY_CONNECTIONS = "421 4.7.0 {host} Error: too many connections, try again later"
    TOO_MANY_JUNK = "421 4.7.0 {host} Error: too many commands that move no mail, closing connection"


# aiosmtpd's own wording, replaced whole where ours says more (or where the code changes:
# HELP is 214, RFC 5321 §4.2.2).  Keys are its exact texts; a prefix key ends with a space.
_LIBRARY_REPLIES = {
    "250 OK": Reply.DONE,
    "221 Bye": Reply.BYE,
    "500 Command line too long": Reply.LINE_TOO_LONG,
    "552 Error: Too much mail data": Reply.TOO_MUCH_DATA,
    "552 Error: message size exceeds fixed maximum message size": Reply.TOO_BIG,
    "554 Command refused due to lack of security": "554 5.7.0 Command refused due to lack of security",
}
_LIBRARY_PREFIXES = {
    "250 Supported commands: ": "214 2.0.0 Supported commands: ",
    "250 Syntax: ": "214 2.0.0 Syntax: ",
}

# The RFC 3463 code for any other reply that comes without one, by its reply code.
_STATUS_BY_REPLY = {
    "214": "2.0.0", "220": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0", "252": "2.0.0",
    "421": "4.3.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0",
    "535": "5.7.8", "538": "5.7.11", "550": "5.0.0", "552": "5.3.4", "553": "5.1.3", "554": "5.0.0",
    "555": "5.5.4",
}
_HAS_STATUS = re.compile(r"\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def with_status_code(reply: str, limit: int) -> str:
    """``reply`` with an enhanced status code; ``limit`` fills in the size limit."""
    if reply in _LIBRARY_REPLIES:
        return _LIBRARY_REPLIES[reply].format(limit=limit)
    for prefix, ours in _LIBRARY_PREFIXES.items():
        if reply.startswith(prefix):
            return ours + reply[len(prefix):]
    if reply[:1] not in "245" or _HAS_STATUS.match(reply):
        return reply  # 3xx take none; coded already
    code, sep, text = reply[:3], reply[3:4], reply[4:]
    status = _STATUS_BY_REPLY.get(code, f"{code[0]}.0.0")
    return f"{code}{sep or ' '}{status} {text}".rstrip()
