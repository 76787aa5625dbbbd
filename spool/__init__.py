"""Durable state only: the outbound queue, local Maildirs, fetch state, session records.

Nothing here imports ``gateway`` or ``modem``; every change of a message's state goes
through the small API in ``spool.queue`` and ``spool.maildir``.
"""
