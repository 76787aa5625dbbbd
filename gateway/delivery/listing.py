"""Every alias, catch-all, group, forward and automatic reply, and where mail to it goes:
the lines ``dialmail aliases list`` prints and the web console's users page shows, made
once here so both say the same."""
from __future__ import annotations

from gateway.config import Config
from gateway.delivery.stages.autoreply import Responder
from gateway.office.directory import Directory


def _expansion(directory: Directory, addr: str, stored: Directory.Stored | None = None) -> str:
    res = directory.resolve(addr, pick=None, stored=stored)
    if res is None:
        return "(nobody: mail bounces)"
    parts = [f"mailbox {m}" for m in res.mailboxes] + list(res.remote)
    parts += [f"one member of {g} in turn" for g in res.rotations]
    return ", ".join(parts) or "(automatic reply only)"


def _addresses(cfg: Config, name: str) -> list[str]:
    return [name] if "@" in name else [f"{name}@{d}" for d in cfg.server.domains]


def lines(cfg: Config, directory: Directory, responder: Responder) -> list[str]:
    pol = cfg.policy
    state = responder.state
    expansion = lambda addr: _expansion(directory, addr, state.forward)  # noqa: E731
    out = ["ALIASES"]
    for name, targets in sorted(cfg.aliases.items()):
        if name.startswith("@"):
            continue
        for addr in _addresses(cfg, name):
            out += [f"  {addr:<34} = {', '.join(targets)}", f"  {'':<34} -> {expansion(addr)}"]
    for always in ("postmaster", "abuse"):
        if always not in cfg.aliases:
            for addr in _addresses(cfg, always):
                out.append(f"  {addr:<34} (always exists) -> {expansion(addr)}")
    out.append("CATCH-ALLS")
    for name, targets in sorted(cfg.aliases.items()):
        if name.startswith("@"):
            out += [f"  *{name:<33} = {', '.join(targets)}",
                    f"  {'':<34} -> {expansion('no-such-name-xyzzy' + name)}"]
    out.append("GROUPS")
    for name, group in sorted(pol.groups.items()):
        flags = group.mode + (", members only" if group.members_only else "")
        for addr in _addresses(cfg, name):
            out.append(f"  {addr:<34} [{flags}] = {', '.join(group.members)}")
            if group.mode == "all":
                out.append(f"  {'':<34} -> {expansion(addr)}")
    out.append("FORWARDS")
    # The spool's forwarding (set by the user or with dialmail users forward) wins over the file's.
    for user in sorted(set(pol.forwards) | {f.user for f in state.forwards()}):
        fwd = directory.forward_of(user, state.forward)
        where = "" if state.forward(user) is None else " [set in the spool]"
        if fwd is None:
            out.append(f"  {user:<34} (forwarding off){where}")
        else:
            out.append(f"  {user:<34} -> {', '.join(fwd.to)}{' (keeps a copy)' if fwd.keep else ''}{where}")
    out.append("AUTOMATIC REPLIES")
    for addr, auto in sorted(pol.autoresponders.items()):
        out.append(f"  {addr:<34} answers with {auto.file} (once per sender every {auto.every}s)")
    users = sorted(set(pol.vacations) | {v.user for v in responder.state.vacations()})
    for user in users:
        vac = responder.vacation(user)
        out.append(f"  {user:<34} out of office: {'ON' if vac else 'off'}{' - ' + (vac.subject or 'Auto: <subject answered>') if vac else ''}")
    return out
