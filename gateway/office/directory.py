"""Who lives here: turning a local address into mailboxes and outside addresses.

A local address is ``local@domain`` with ``domain`` in ``[server] domains``.  It
resolves, in this order, to:

1. an alias from ``[aliases]`` (``name`` applies to every local domain, ``name@domain``
   to that domain only), expanded recursively;
2. a group from ``[groups]`` (named the same way): every member, or for a round-robin
   group the one member whose turn it is (chosen at delivery by the ``pick`` callback,
   which keeps the turn in the spool); ``members_only`` groups refuse other senders;
3. a user from the users file (``alice`` in every domain, ``alice@domain`` there only),
   or where its forwarding sends that user's mail (plus the user's own mailbox with
   ``keep = true``): the forwarding kept in the spool (``dialmail users forward``, the
   web console) when the caller passes it, else ``[forward]``;
4. ``postmaster`` and ``abuse``, which always exist and fall back to ``[server] postmaster``
   or, failing that, a mailbox of their own; ``root`` (what cron and scripts write to)
   goes to the postmaster;
5. the domain's catch-all, ``"@domain" = [targets]`` in ``[aliases]``;
6. an autoresponder address from ``[autoreply]``, which exists even when nobody reads it.

Anything else is unknown (550 at RCPT time).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from gateway.config import Config
from gateway.config.policy import Forward
from gateway.mail import address

if TYPE_CHECKING:  # the users file module hashes a dummy password at import: not needed to parse config
    from spool.policystate import StoredForward
    from spool.users import Users

ALWAYS = ("postmaster", "abuse")
TO_POSTMASTER = ("root",)  # unless a user or alias of that name exists
MAX_DEPTH = 10


@dataclass
class Resolution:
    """Where one address goes: local mailboxes (user names) and outside addresses."""
    mailboxes: list[str] = field(default_factory=list)
    remote: list[str] = field(default_factory=list)
    refused_by: str | None = None  # a members-only group the sender may not post to
    rotations: list[str] = field(default_factory=list)  # round-robin groups met without a picker

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

    # A picker chooses the member of a round-robin group: pick(group_name, members) -> member.
    Picker = Callable[[str, tuple], str]

    # The spool's forwarding of a user: stored(user) -> StoredForward | None (PolicyState.forward).
    Stored = Callable[[str], "StoredForward | None"]

    def resolve(self, addr: str, sender: str | None = None, pick: "Directory.Picker | None" = None,
                stored: "Directory.Stored | None" = None) -> Resolution | None:
        """Expand a local address; None when nobody here has that address.

        With ``sender``, members-only groups are checked (``refused_by`` names the group
        that refuses); with ``pick``, round-robin groups resolve to the member in turn,
        without it they are only noted in ``rotations``; with ``stored``, a user's
        forwarding kept in the spool wins over the configuration's.
        """
        if not address.is_plain(addr) or not self.is_local(addr):
            return None
        out = Resolution()
        ctx = _Walk(sender=sender, pick=pick, stored=stored)
        if not self._expand(address.normalise(addr), out, seen=set(), depth=0, ctx=ctx):
            if address.normalise(addr).lower() in self._policy("autoresponders"):
                return out
            return None
        return out

    def _policy(self, name: str) -> dict:
        policy = getattr(self.config, "policy", None)
        return getattr(policy, name) if policy is not None else {}

    def _alias(self, local: str, domain: str) -> tuple[str, ...] | None:
        aliases = self.config.aliases
        return aliases.get(f"{local}@{domain}") or aliases.get(local)

    def group(self, local: str, domain: str):
        groups = self._policy("groups")
        return groups.get(f"{local}@{domain}") or groups.get(local)

    def forward_of(self, user: str, stored: "Directory.Stored | None" = None) -> Forward | None:
        """Where ``user``'s mail is forwarded: the spool's setting (on or off) wins over ``[forward]``."""
        kept = stored(user) if stored is not None else None
        if kept is not None:
            return Forward(user, kept.to, kept.keep) if kept.enabled else None
        return self._policy("forwards").get(user)

    def is_member(self, group, sender: str) -> bool:
        """Whether ``sender`` is one of the group's members (by address or by user)."""
        sender = address.normalise(sender).lower()
        if not sender:
            return False
        user = self.user_for(sender)
        domain = address.split(group.name)[1] if "@" in group.name else address.split(sender)[1]
        for member in group.members:
            if "@" in member:
                if member.lower() == sender or (user and self.user_for(member) == user):
                    return True
            elif user == member or sender == f"{member}@{domain}":
                return True
        return False

    def _expand(self, addr: str, out: Resolution, seen: set[str], depth: int, ctx: "_Walk") -> bool:
        local, domain = address.split(addr)
        local = local.lower()
        key = f"{local}@{domain}"
        if key in seen or depth > MAX_DEPTH:
            return True  # a loop in the alias table: the earlier expansion already covers it
        seen.add(key)
        targets = self._alias(local, domain)
        if targets:
            for target in targets:
                self._target(target, domain, out, seen, depth, ctx)
            return True
        group = self.group(local, domain)
        if group is not None:
            if group.members_only and ctx.sender is not None and not self.is_member(group, ctx.sender):
                out.refused_by = out.refused_by or group.name
                return True
            if group.mode == "round-robin":
                if ctx.pick is None:
                    out.rotations.append(group.name)
                    return True
                members = (ctx.pick(group.name, group.members),)
            else:
                members = group.members
            for member in members:
                self._target(member, domain, out, seen, depth, ctx)
            return True
        user = self.user_for(addr)
        if user:
            self._user(user, domain, out, seen, depth, ctx)
            return True
        if local in TO_POSTMASTER:  # cron and scripts mail root, as /etc/aliases has it
            return self._expand(f"postmaster@{domain}", out, seen, depth + 1, ctx)
        if local in ALWAYS:
            pm = address.normalise(self.config.server.postmaster)
            if pm.lower() != key and self.is_local(pm) and self._expand(pm, out, seen, depth + 1, ctx):
                return True
            out.add_mailbox(local)
            return True
        catch_all = self.config.aliases.get(f"@{domain}")
        if catch_all and f"@{domain}" not in seen:
            seen.add(f"@{domain}")
            for target in catch_all:
                self._target(target, domain, out, seen, depth, ctx)
            return True
        return False

    def _user(self, user: str, domain: str, out: Resolution, seen: set[str], depth: int, ctx: "_Walk") -> None:
        fwd = self.forward_of(user, ctx.stored)
        if fwd is None or f"user:{user}" in seen:
            out.add_mailbox(user)
            return
        seen.add(f"user:{user}")
        before = (len(out.mailboxes), len(out.remote))
        for target in fwd.to:
            self._target(target, domain, out, seen, depth, ctx)
        # keep = true, or a forwarding loop that led nowhere new: the user keeps the mail.
        if fwd.keep or (len(out.mailboxes), len(out.remote)) == before:
            out.add_mailbox(user)

    def _target(self, target: str, domain: str, out: Resolution, seen: set[str], depth: int,
                ctx: "_Walk") -> None:
        target = target.strip()
        if "@" not in target:
            name = target.lower()
            if self.users.exists(name) and not self._alias(name, domain) and self.group(name, domain) is None:
                self._user(name, domain, out, seen, depth, ctx)
                return
            target = f"{target}@{domain}"
        target = address.normalise(target)
        if self.is_local(target):
            if not self._expand(target, out, seen, depth + 1, ctx):
                # An alias pointing at nobody: the postmaster gets it rather than nobody.
                self._expand(f"postmaster@{domain}", out, seen, depth + 1, ctx)
        else:
            out.add_remote(target)


@dataclass
class _Walk:
    sender: str | None
    pick: Callable[[str, tuple], str] | None
    stored: Callable[[str], "StoredForward | None"] | None = None
