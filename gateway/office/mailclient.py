"""What a mail client needs to reach this gateway: the servers, ports and security that
``dialmail users add`` prints and the web console's autoconfig/autodiscover answers serve,
worked out once from the config so the two always agree."""
from __future__ import annotations

from dataclasses import dataclass

from gateway.config import Config


@dataclass(frozen=True)
class ClientServer:
    protocol: str  # IMAP | POP3 | SMTP
    host: str
    port: int | None
    starttls: bool
    plaintext_lan: bool  # no TLS, yet logins are accepted from the LAN (not only this machine)
    login_needed: bool = True  # SMTP from the office LAN relays without a login

    @property
    def incoming(self) -> bool:
        return self.protocol != "SMTP"


def _port(listens) -> int | None:
    return listens[0].port if listens else None


def client_servers(config: Config) -> list[ClientServer]:
    """The incoming servers (IMAP first when it runs, then POP3) and the outgoing one:
    submission (port 587, always STARTTLS) when configured, else the SMTP listener."""
    host = config.server.hostname
    servers = []
    if config.imap.enabled:
        servers.append(ClientServer("IMAP", host, _port(config.imap.listen), bool(config.imap.tls_cert),
                                    config.imap.allow_plaintext_lan))
    servers.append(ClientServer("POP3", host, _port(config.pop3.listen), bool(config.pop3.tls_cert),
                                config.pop3.allow_plaintext_lan))
    if config.submission is not None and config.submission.listen:
        servers.append(ClientServer("SMTP", host, _port(config.submission.listen), True, False))
    else:
        servers.append(ClientServer("SMTP", host, _port(config.smtp.listen), bool(config.smtp.tls_cert), False,
                                    login_needed=False))
    return servers
