"""The per-recipient stages of local delivery, each a module of its own; the order is
gateway.delivery.pipeline's.
"""
