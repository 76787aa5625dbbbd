"""Local delivery: the worker that claims queued local recipients (``worker``) and runs each
message through the pipeline (``pipeline``) of stages (``stages``): expansion,
forwarding, mailboxes, automatic replies, quarantine and review.
"""
