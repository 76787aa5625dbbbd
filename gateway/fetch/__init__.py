"""Collecting mail from the ISP's IMAP mailboxes into the spool, exactly once (``imap``),
and reading the envelope recipients the ISP recorded in the headers (``envelope``).
"""
