"""pyserial URL handlers: ``serial_for_url("sim://...")`` after ``modem.urlhandler.register()``."""
from __future__ import annotations

import serial

PACKAGE = "modem.urlhandler"


def register() -> None:
    """Make pyserial look here for ``protocol_<scheme>`` modules (idempotent)."""
    if PACKAGE not in serial.protocol_handler_packages:
        serial.protocol_handler_packages.append(PACKAGE)
