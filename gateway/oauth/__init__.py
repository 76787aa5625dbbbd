"""OAuth2 for the ISP-side logins: the tokens that stand in for a password at Microsoft 365,
Gmail and other providers (SASL XOAUTH2 or OAUTHBEARER).

``tokens`` hands the fetch and the relay a working access token, refreshing it over the
line that is up (never while offline: only the online part of a session asks), and turns a
refresh token the provider refused into one clear account error and one postmaster
notice.  ``login`` runs the one-time interactive flows of ``dialmail oauth login``.  The
tokens themselves live in the spool (``spool.tokens``).
"""
