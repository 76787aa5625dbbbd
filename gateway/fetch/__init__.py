"""Collecting mail from the ISP's IMAP mailboxes into the spool, exactly once.

``imap`` speaks IMAP and runs the account loop; ``plan`` decides what to fetch and in
which order (sans-IO); ``recipients`` says who gets each copy, reading the envelope
headers through ``envelope``; ``partial`` downloads large messages in pieces to disk;
``notice`` words the notices of the size policy.
"""
