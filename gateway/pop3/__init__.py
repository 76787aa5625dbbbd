"""POP3 service: local users read their Maildirs with any office mail client.

``protocol`` is the sans-IO dialogue (lines in, actions out), ``wire`` turns stored
message bytes into the dot-stuffed CRLF form, ``maildrop`` is the Maildir side
(listing, locks, UIDLs, new/ -> cur/, deletions at UPDATE), and ``server`` is the thin
asyncio shell around them; password guessing is slowed and locked out by
gateway.policy.throttle, shared with SMTP AUTH.
"""
