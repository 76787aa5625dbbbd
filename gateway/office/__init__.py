"""What this office knows at run time, shared by every job: the directory (who lives here:
users, aliases, groups, forwards) and the system messages it sends (bounces and delay
warnings to senders, notices to the postmaster), with ``settle``, the one place a
message whose recipients are all final leaves the queue.
"""
