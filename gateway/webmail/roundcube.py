"""Roundcube's configuration, written from dialmail's own settings.

Roundcube (Debian's ``roundcube-core``) reads its configuration from the directory named
by ``ROUNDCUBE_CONFIG_DIR`` (default ``/etc/roundcube``): ``config.inc.php`` there, on top
of ``defaults.inc.php``.  What is written here makes a complete directory of that kind, so
one command gives an office a webmail whichever web server runs it: PHP's built-in server
for a small office, or Apache with Debian's ``/etc/roundcube/apache.conf``.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

# Debian's roundcube-core: the defaults every config.inc.php is read on top of, the MIME
# table and the document root.  The SQLite database needs nothing here: Roundcube's SQLite
# driver creates it with its schema at the first request (roundcube.db, mode 0600).
DEBIAN_CONFIG = Path("/etc/roundcube")
DEBIAN_DOCROOT = Path("/var/lib/roundcube/public_html")

SECURITY = ("starttls", "tls", "none")


@dataclass(frozen=True)
class Endpoint:
    """A server Roundcube talks to, and how it secures the connection."""
    host: str
    port: int
    security: str  # "starttls", "tls" (implicit) or "none"

    def url(self) -> str:
        scheme = {"starttls": "tls://", "tls": "ssl://", "none": ""}[self.security]
        return f"{scheme}{self.host}:{self.port}"


@dataclass(frozen=True)
class Webmail:
    imap: Endpoint
    smtp: Endpoint
    mail_domain: str  # appended to a bare login name for the From: address
    product_name: str
    # The certificate the IMAP and submission listeners present: Roundcube verifies it
    # against this file (a self-signed office certificate is then trusted, and only it).
    ca_file: Path | None
    peer_name: str  # the name the certificate is for


def _php(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "[" + ", ".join(f"{_php(k)} => {_php(v)}" for k, v in value.items()) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_php(v) for v in value) + "]"
    text = str(value)
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _tls_options(w: Webmail) -> dict:
    if w.ca_file is None:
        return {"ssl": {"verify_peer": True, "verify_peer_name": True, "peer_name": w.peer_name}}
    return {"ssl": {"verify_peer": True, "verify_peer_name": True, "peer_name": w.peer_name,
                    "cafile": str(w.ca_file)}}


def config_text(w: Webmail, state: Path, des_key: str) -> str:
    """``config.inc.php`` for ``w``, keeping Roundcube's database, temp files and logs in ``state``."""
    settings: dict[str, object] = {
        "db_dsnw": f"sqlite:///{state / 'roundcube.db'}?mode=0600",
        "imap_host": w.imap.url(),
        "smtp_host": w.smtp.url(),
        # the user's own login is what the submission listener checks
        "smtp_user": "%u",
        "smtp_pass": "%p",
        "mail_domain": w.mail_domain,
        "username_domain": "",
        "product_name": w.product_name,
        "des_key": des_key,
        "temp_dir": f"{state / 'temp'}/",
        "log_dir": f"{state / 'logs'}/",
        "log_driver": "file",
        "plugins": [],
        "skin": "elastic",
        "enable_installer": False,
        "enable_spellcheck": False,
        # the folders dialmail creates with SPECIAL-USE
        "drafts_mbox": "Drafts",
        "sent_mbox": "Sent",
        "junk_mbox": "Junk",
        "trash_mbox": "Trash",
    }
    if w.imap.security != "none":
        settings["imap_conn_options"] = _tls_options(w)
    if w.smtp.security != "none":
        settings["smtp_conn_options"] = _tls_options(w)
    lines = ["<?php", "// Written by `dialmail webmail config`: run it again after changing dialmail's settings.",
             "$config = [];"]
    lines += [f"$config[{_php(key)}] = {_php(value)};" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def write(w: Webmail, directory: Path) -> Path:
    """Make ``directory`` a complete Roundcube configuration directory; returns config.inc.php.

    The key Roundcube encrypts IMAP passwords in its session with is made once and kept,
    so rewriting the configuration does not log every user out.  Everything here holds a
    secret or mail, so it is the owner's alone (0700 / 0600).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for sub in ("temp", "logs"):
        (directory / sub).mkdir(mode=0o700, exist_ok=True)
    key_file = directory / "des_key"
    if key_file.exists():
        des_key = key_file.read_text().strip()
    else:
        des_key = secrets.token_urlsafe(18)[:24]
        _write_private(key_file, des_key + "\n")
    for name in ("defaults.inc.php", "mimetypes.php"):
        link = directory / name
        if not link.exists() and (DEBIAN_CONFIG / name).exists():
            link.symlink_to(DEBIAN_CONFIG / name)
    config = directory / "config.inc.php"
    _write_private(config, config_text(w, directory, des_key))
    return config



def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
