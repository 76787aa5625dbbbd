"""The configuration: one TOML file read once into typed objects (gateway.config.model).

``reader`` parses and validates the file (``sections`` names file, line and key in every
error), ``policy`` reads the delivery policy's sections, ``dialtimes`` the dial rules.
Code below receives ``Config`` and never reads raw dicts or environment variables.
"""
from gateway.config.model import (
    DEFAULT_PATH,
    ENV_VAR,
    IMAP_OFF,
    Config,
    DeliveryConfig,
    DemandConfig,
    FetchConfig,
    IMAPConfig,
    LinkConfig,
    Listen,
    LMTPTarget,
    POP3Config,
    QueueConfig,
    ScheduleConfig,
    ServerConfig,
    SessionConfig,
    SmarthostConfig,
    SMTPConfig,
    SubmissionConfig,
    WebConfig,
    client_address,
    is_loopback,
    parse_duration,
    parse_listen,
    parse_lmtp,
    parse_size,
    parse_window,
    read_secret,
)
from gateway.config.reader import find_config_path, load, loads
from gateway.config.sections import find_line, key_lines
from gateway.mail.errors import ConfigError

__all__ = [
    "DEFAULT_PATH", "ENV_VAR", "Config", "ConfigError", "DeliveryConfig", "LMTPTarget", "SubmissionConfig", "DemandConfig", "FetchConfig", "IMAP_OFF", "IMAPConfig", "LinkConfig", "Listen",
    "POP3Config", "QueueConfig", "ScheduleConfig", "ServerConfig", "SessionConfig", "SMTPConfig",
    "SmarthostConfig", "WebConfig", "client_address", "find_config_path", "find_line", "is_loopback", "key_lines", "load",
    "loads", "parse_duration", "parse_listen", "parse_lmtp", "parse_size", "parse_window", "read_secret",
]
