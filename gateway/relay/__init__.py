"""Sending the outbound queue: the flush over one reused connection to the smarthost or by
MX (``flush``), MX planning (``mx``), sender rewriting on the way out (``rewrite``) and
queue expiry (``expiry``).
"""
