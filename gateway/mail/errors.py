"""Errors split by whose fault they are (the CLI alone turns them into exit codes)."""


class DialmailError(Exception):
    """Base of every error dialmail raises on purpose."""


class ConfigError(DialmailError):
    """Something the admin must fix in the configuration; printed as one line at start-up."""


class OperationalError(DialmailError):
    """Something went wrong while working (network, disk, peer); may succeed later."""


class TransientError(OperationalError):
    """Worth retrying later: 4xx replies, timeouts, lost carrier, full disk."""


class PermanentError(OperationalError):
    """Retrying will not help: 5xx replies, a message the peer will never take."""
