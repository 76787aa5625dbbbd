"""Dovecot's configuration, written from dialmail's: nothing about the mailboxes is said twice.

Checked with Dovecot 2.3.19 (Debian 12): it reads dialmail's ``new/<t>.<qid>.<host>,S=<size>``
files and dot-folders as they are, moves mail to ``cur/`` with ``:2,<flags>``, and logs
users in straight from dialmail's argon2id hashes (passdb passwd-file ``scheme=ARGON2ID``).
``pop3_uidl_format = %f`` makes Dovecot's UIDLs the ones dialmail's POP3 gives.
"""
from __future__ import annotations

import grp
import pwd
from pathlib import Path

from gateway.config import Config
from gateway.imap.store import DovecotPaths, MailOwner

# The folders every client expects, marked for it (RFC 6154) and there from the first login.
SPECIAL_USE = (("Sent", r"\Sent"), ("Drafts", r"\Drafts"), ("Trash", r"\Trash"), ("Junk", r"\Junk"))


def mailbox_settings(config: Config, owner: MailOwner, paths: DovecotPaths) -> str:
    """Users, mail location, UIDLs and folders: what any Dovecot needs to serve dialmail's Maildirs."""
    folders = "".join(f"  mailbox {name} {{\n    special_use = {flag}\n    auto = subscribe\n  }}\n"
                      for name, flag in SPECIAL_USE)
    access = f"mail_access_groups = {owner.access_group}\n" if owner.access_group else ""
    return (
        f"# dialmail's users, argon2id hashes as dialmail keeps them (changes apply at once)\n"
        f"auth_username_format = %Lu\n"
        f"passdb {{\n"
        f"  driver = passwd-file\n"
        f"  args = scheme=ARGON2ID {paths.users}\n"
        f"}}\n"
        f"# every mailbox belongs to one system user: {owner.user}\n"
        f"userdb {{\n"
        f"  driver = static\n"
        f"  args = uid={owner.uid} gid={owner.gid} home={paths.control}/%u\n"
        f"}}\n"
        f"first_valid_uid = {owner.uid}\n"
        f"{access}"
        f"# dialmail's Maildirs; Dovecot's uidlists and indexes kept outside them\n"
        f"mail_location = maildir:{paths.mail}/%u:INDEX={paths.index}/%u:CONTROL={paths.control}/%u\n"
        f"# the UIDLs dialmail's POP3 gives: either program may serve POP3\n"
        f"pop3_uidl_format = %f\n"
        f"namespace inbox {{\n"
        f"  inbox = yes\n"
        f"  separator = /\n"
        f"{folders}"
        f"}}\n")


def managed(config: Config, owner: MailOwner, paths: DovecotPaths) -> str:
    """The complete configuration of the Dovecot that ``dialmail run`` starts."""
    imap = config.imap
    source = config.path or "the configuration"
    if imap.tls_cert:
        tls = f"ssl = yes\nssl_cert = <{imap.tls_cert}\nssl_key = <{imap.tls_key}\nssl_min_protocol = TLSv1.2\n"
    else:
        tls = "ssl = no\n"
    trusted = ""
    if imap.allow_plaintext_lan:  # Dovecot treats trusted networks as secured: plaintext logins allowed
        trusted = f"login_trusted_networks = {' '.join(str(n) for n in config.server.mynetworks)}\n"
    listeners = _listeners(imap.listen)
    if owner.as_root:
        processes, chroot = "", ""
    else:  # one user for everything, and no chroot(): only root may
        group = grp.getgrgid(owner.gid).gr_name
        me = pwd.getpwuid(owner.uid).pw_name
        processes = (f"default_internal_user = {me}\ndefault_internal_group = {group}\n"
                     f"default_login_user = {me}\n")
        chroot = "  chroot =\n"
    services = (f"service imap-login {{\n{chroot}{listeners}  inet_listener imaps {{\n    port = 0\n  }}\n}}\n"
                f"service anvil {{\n{chroot}}}\n"
                f"service ipc {{\n{chroot}}}\n")
    return (
        f"# Written by dialmail from {source} at every start: change that file, not this one.\n"
        f"protocols = imap\n"
        f"listen = *\n"
        f"base_dir = {paths.base_dir}\n"
        f"state_dir = {paths.state_dir}\n"
        f"# Dovecot's log goes to dialmail's (dovecot -F, stderr)\n"
        f"log_path = /dev/stderr\n"
        f"info_log_path = /dev/stderr\n"
        f"log_timestamp =\n"
        f"{processes}"
        f"{tls}"
        f"disable_plaintext_auth = yes\n"
        f"{trusted}"
        f"auth_mechanisms = plain login\n"
        f"{mailbox_settings(config, owner, paths)}"
        f"{services}")


def _listeners(listen) -> str:
    """One inet_listener per [imap] listen entry (Dovecot names them; names must differ)."""
    out = []
    for i, lst in enumerate(listen):
        host = "*" if lst.host in ("0.0.0.0", "") else ("[::]" if lst.host == "::" else lst.host)
        out.append(f"  inet_listener imap{'' if i == 0 else i + 1} {{\n    address = {host}\n"
                   f"    port = {lst.port}\n  }}\n")
    return "".join(out)


def fragment(config: Config, owner: MailOwner, paths: DovecotPaths) -> str:
    """What an admin adds to an existing Dovecot (``dovecot = "external"``)."""
    return (f"# dialmail: add to your Dovecot's configuration, e.g. as /etc/dovecot/conf.d/99-dialmail.conf,\n"
            f"# then: systemctl reload dovecot.  Written from {config.path or 'the configuration'}.\n"
            f"# Its passdb and userdb come beside yours (to serve dialmail's users only, remove yours,\n"
            f"# e.g. '!include auth-system.conf.ext' in conf.d/10-auth.conf); mail_location,\n"
            f"# pop3_uidl_format and the inbox namespace's folders replace yours.\n"
            f"{mailbox_settings(config, owner, paths)}")


def write(config: Config, owner: MailOwner, paths: DovecotPaths) -> Path:
    """Write the managed configuration where ``dovecot -c`` will read it."""
    text = managed(config, owner, paths)
    tmp = paths.conf.with_name(paths.conf.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(paths.conf)
    return paths.conf
