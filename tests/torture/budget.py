"""How hard the torture and fuzz runs push: short inside `make test`, long under
`make torture` (pytest --torture-long, set by tests/torture/conftest.py at start-up)."""
LONG = False


def examples(short: int, long: int) -> int:
    return long if LONG else short
