"""Webmail: the configuration Roundcube (from Debian's packages) needs to sit on top of the
office's IMAP (Dovecot) and submission listeners.  dialmail does not serve webmail itself."""
