"""The demo: the whole system on a simulated modem and ISP (``scenario``), with the
simulated ISP's IMAP and SMTP servers (``simisp``).
"""
