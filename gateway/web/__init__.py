"""The web console inside the daemon: a dashboard with Connect now and its live progress,
the session log with charts, the queue, the quarantine, users for the administrators,
and each user's own password and out-of-office.

``service`` runs it under uvicorn in the daemon's event loop, ``console`` has the pages,
``login`` the cookie, CSRF and who may see what, ``progress`` the session's lines for
Server-Sent Events, and ``charts`` the sessions page's pygal charts.
"""
