"""SMTP replies dialmail sends, named once; tests import the same names."""


class Reply:
    OK = "250 2.1.0 Ok"
    QUEUED = "250 2.0.0 Ok: queued as {qid}"
    NO_SUCH_USER = "550 5.1.1 No such user here"
    RELAY_DENIED = "554 5.7.1 Relay access denied"
    BAD_ADDRESS = "553 5.1.3 Address not accepted: use a plain user@domain address"
    TOO_BIG = "552 5.3.4 Message too big for this system (limit {limit} bytes)"
    NO_SPACE = "452 4.3.1 Insufficient system storage, try again later"
    LOCAL_ERROR = "451 4.3.0 Local error in processing, try again later"
    TOO_MANY_RCPTS = "452 4.5.3 Too many recipients"
    SENDER_BLOCKED = "550 5.7.1 Sender address rejected: blocked by local policy"
    VIRUS = "554 5.7.1 Message rejected: virus found ({name})"
    SCAN_FAILED = "451 4.7.1 Message could not be scanned for viruses, try again later"
    MEMBERS_ONLY = "550 5.7.1 Only members of this group may send to it"
    AUTH_LOCKED = "454 4.7.0 Too many failed logins from your address, try again later"
    CONTENT_BLOCKED = "550 5.7.1 Message rejected: From address blocked by local policy"
