"""The admission policy that both SMTP (at RCPT/DATA, so the LAN sender hears it) and local
delivery (for fetched mail) apply: size limits, block lists, the virus scan, their
``Verdict``, and the login throttle of SMTP AUTH and POP3.
"""
