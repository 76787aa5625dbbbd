"""Dial sessions: one session (``session``) going online through the one link bring-up
(``link``, which ``dialmail queue flush`` uses too), what it reports as it goes
(``events``) and writes down (``transcript``), the daemon's runner that runs one at a
time (``runner``), the scheduler (``scheduler``) with its dial-on-demand decisions
(``demand``), and the events as lines for people (``progress``).
"""
