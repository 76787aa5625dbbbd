"""SMTP on the LAN: the aiosmtpd server and its handler (``server``), the admission hooks run
at SMTP time (``admission``) and the reply texts (``replies``).
"""
