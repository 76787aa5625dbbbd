"""Dial sessions: one session and its transcript (``session``), the daemon's runner that
runs one at a time (``runner``), the scheduler (``scheduler``) with its dial-on-demand
decisions (``demand``), and the events as lines for people (``progress``).
"""
