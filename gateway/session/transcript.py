"""The transcript of one session: its events and the modem's AT dialogue, for troubleshooting.

    with Transcript(path) as transcript, transcript.dialogue():
        transcript.event(Dialing("sim"))      # "12:00:01 [dialing] backend=sim"

Credentials are masked on every line.  While ``dialogue()`` is entered the
``modem.dialogue`` logger writes here instead of to the daemon's log; on the way out,
however the session ends (error, interrupt, cancellation), that logger gets back exactly
the level, handlers and propagation it had, so a daemon running many sessions does not
drift into a logging setup nobody configured.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

from gateway.session.events import Done, Event

DIALOGUE_LOGGER = "modem.dialogue"

_SECRET = re.compile(r"(?i)(pass(word)?|auth\s+(plain|login)|login)(\s+\S+\s*)(\S+)")
# OAuth2: a bearer token in any form a line may carry it (an HTTP header, a SASL initial
# response, a token endpoint's JSON or form body).
_TOKEN = re.compile(r"(?i)((?:bearer|(?:auth(?:enticate)?)\s+(?:xoauth2|oauthbearer))\s+)\S+"
                    r"|((?:access|refresh|id)_token\W{1,4}|[?&](?:device_)?code=)[^\s\"'&,}]+")


def mask(text: str) -> str:
    """Hide anything that looks like a credential in a transcript line."""
    text = _TOKEN.sub(lambda m: (m.group(1) or m.group(2)) + "********", text)
    return _SECRET.sub(lambda m: m.group(1) + m.group(4) + "********", text)


class Transcript:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.file = open(path, "a", encoding="utf-8")
        self.failed = False

    def __enter__(self) -> Transcript:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, text: str) -> None:
        """Add lines; the first failure (a full disk) is raised, later lines are dropped."""
        if self.failed:
            return
        stamp = time.strftime("%H:%M:%S")
        try:
            for line in str(text).splitlines() or [""]:
                self.file.write(f"{stamp} {mask(line)}\n")
            self.file.flush()
        except OSError:
            self.failed = True
            raise

    def event(self, event: Event) -> None:
        self.write(describe(event))

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # what did not fit stays unwritten; closing must not fail the session
            self.failed = True

    @contextlib.contextmanager
    def dialogue(self) -> Iterator[None]:
        """Copy the modem's AT dialogue into this transcript for as long as the block runs."""
        logger = logging.getLogger(DIALOGUE_LOGGER)
        level, propagate = logger.level, logger.propagate
        handler = _DialogueHandler(self)
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def describe(event: Event) -> str:
    """``[kind] name=value ...``; a finished session's record is in the session log, not repeated."""
    rest = " ".join(f"{f.name}={_shown(getattr(event, f.name))}" for f in dataclasses.fields(event)
                    if not (isinstance(event, Done) and f.name == "record"))
    return f"[{event.kind}] {rest}"


def _shown(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


class _DialogueHandler(logging.Handler):
    def __init__(self, transcript: Transcript):
        super().__init__(logging.DEBUG)
        self.transcript = transcript

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.transcript.write("[at] " + record.getMessage())
        except Exception:
            self.handleError(record)
