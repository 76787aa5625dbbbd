"""Errors of the link, split by whose fault they are.

The modem package never imports the gateway; the gateway's config loader turns a
``LinkConfigError`` into its own ``ConfigError`` and the session treats ``LinkError``
subclasses by their ``transient`` flag.
"""
from __future__ import annotations


class LinkError(Exception):
    """Base of every error the link raises on purpose; the message is meant for a user."""

    #: Whether trying again later may succeed (busy line) or not (no such device).
    transient = True


class LinkConfigError(LinkError):
    """A ``[link]`` key the admin must fix; raised when the settings are parsed."""

    transient = False

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"[link] {key}: {message}")
        self.key = key
        self.message = message


class ModemNotResponding(LinkError):
    """The port opened but the modem did not answer AT commands (or the port would not open)."""


class DialFailed(LinkError):
    """Every number was tried as often as allowed (or time ran out) without a CONNECT."""

    def __init__(self, message: str, failures: tuple = ()) -> None:
        super().__init__(message)
        self.failures = failures


class LinkUpFailed(LinkError):
    """The call or command succeeded but the network interface never came up."""


class PortUnavailable(LinkError):
    """The serial device could not be opened (missing, in use, no permission)."""

    transient = False
