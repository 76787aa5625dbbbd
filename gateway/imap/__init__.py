"""IMAP for the LAN: Dovecot on dialmail's own Maildirs, never a home-made IMAP server.

``store`` gets the spool ready for Dovecot (who owns the Maildirs, who may read the users
file, where Dovecot keeps its indexes, the postmaster's quarantine folder); ``dovecotconf``
writes Dovecot's configuration from dialmail's (complete, for ``dovecot = "managed"``, or
the fragment an admin adds to an existing Dovecot); ``supervisor`` runs ``dovecot -F`` as
the daemon's child; ``probe`` checks a Dovecot that dialmail does not run.
"""
