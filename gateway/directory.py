"""Who lives here: turning a local address into mailboxes and outside addresses.

A local address is ``local@domain`` with ``domain`` in ``[server] domains``.  It
resolves, in this order, to:

1. an alias from ``[aliases]`` (``name`` applies to every local domain, ``name@domain``
   to that domain only), expanded recursively;
2. a user from the users file (``alice`` in every domain, ``alice@domain`` there only);
3. ``postmaster`` and ``abuse``, which always exist and fall back to ``[server] postmaster``
   or, failing that, a mailbox of their own.

Anything else is unknown (550 at RCPT time).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gateway import address
from gateway.config import Config
from spool.users import Users

ALWAYS = ("postmaster", "abuse")
MAX_DEPTH = 10


@dataclass
class Resolution:
    """Where one address goes: local mailboxes (user names) and outside addresses."""
    mailboxes: list[str] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)

    def add_mailbox(self, name: str) -> None:
        if name not in self.mailboxes:
            self.mailboxes.append(name)

    def add_remote(self, addr: str) -> None:
        if addr not in self.remote:
            self.remote.append(addr)


class Directory:
    def __init__(self, config: Config, users: Users):
        self.config = config
        self.users = users

    def is_local(self, addr: str) -> bool:
        return self.config.server.is_local_domain(address.split(addr)[1])

    def user_for(self, addr: str) -> str | None:
        """The user owning ``addr`` directly (no aliases), or None."""
        local, domain = address.split(addr)
        local = local.lower()
        if not self.config.server.is_local_domain(domain):
            return None
        for name in (f"{local}@{domain}", local):
            if self.users.exists(name):
                return name
        return None

    def exists(self, addr: str) -> bool:
        return self.resolve(addr) is not None

    def resolve(self, addr: str) -> Resolution | None:
        """Expand a local address; None when nobody here has that address."""
        if not address.is_plain(addr) or not self.is_local(addr):
            return None
        out = Resolution()
        if not self._expand(address.normalise(addr), out, seen=set(), depth=0):
            return None
        return out

    def _alias(self, local: str, domain: str) -> tuple[str, ...] | None:
        aliases = self.config.aliases
        return aliases.get(f"{local}@{domain}") or aliases.get(local)

    def _expand(self, addr: str, out: Resolution, seen: set[str], depth: int) -> bool:
        local, domain = address.split(addr)
        local = local.lower()
        key = f"{local}@{domain}"
        if key in seen or depth > MAX_DEPTH:
            return True  # a loop in the alias table: the earlier expansion already covers it
        seen.add(key)
        targets = self._alias(local, domain)
        if targets:
            for target in targets:
                self._target(target, domain, out, seen, depth)
            return True
        user = self.user_for(addr)
        if user:
            out.add_mailbox(user)
            return True
        if local in ALWAYS:
            pm = address.normalise(self.config.server.postmaster)
            if pm.lower() != key and self.is_local(pm) and self._expand(pm, out, seen, depth + 1):
                return True
            out.add_mailbox(local)
            return True
        return False

    def _target(self, target: str, domain: str, out: Resolution, seen: set[str], depth: int) -> None:
        target = target.strip()
        if "@" not in target:
            if self.users.exists(target.lower()) and not self._alias(target.lower(), domain):
                out.add_mailbox(target.lower())
                return
            target = f"{target}@{domain}"
        target = address.normalise(target)
        if self.is_local(target):
            if not self._expand(target, out, seen, depth + 1):
                # An alias pointing at nobody: the postmaster gets it rather than nobody.
                self._expand(f"postmaster@{domain}", out, seen, depth + 1)
        else:
            out.add_remote(target)
