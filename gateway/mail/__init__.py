"""The shared vocabulary of mail: addresses, delivery outcomes (final or deferred, with an
RFC 3463 status) and the errors split by whose fault they are.  Imports nothing else of
gateway's.
"""
