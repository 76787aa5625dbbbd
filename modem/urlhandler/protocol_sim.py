"""``sim://[NAME][?knob=value&...]``: a pyserial port wired to a simulated modem.

``sim://?rate=33600&busy=2&drop_after_seconds=30`` makes a fresh modem for this port;
``sim://NAME`` attaches to the line registered under NAME (``modem.simulator.register_line``)
so the line shaper and a test can watch the same carrier.  Modem status lines behave as
on real hardware: CD follows the carrier, DSR and CTS are on, and dropping DTR (or
closing the port, like HUPCL) hangs up.
"""
from __future__ import annotations

import time
import urllib.parse

from serial.serialutil import PortNotOpenError, SerialBase, SerialException

from modem.simulator import SimKnobs, SimLine, find_line


class Serial(SerialBase):
    BAUDRATES = (300, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400)

    def __init__(self, *args, **kwargs) -> None:
        self.line: SimLine | None = None
        self._owns_line = False
        super().__init__(*args, **kwargs)

    def open(self) -> None:
        if self.is_open:
            raise SerialException("Port is already open.")
        if self._port is None:
            raise SerialException("Port must be configured before it can be used.")
        self.line, self._owns_line = self._line_for(self.portstr)
        self.is_open = True
        self._update_dtr_state()

    @staticmethod
    def _line_for(url: str) -> tuple[SimLine, bool]:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "sim":
            raise SerialException(f"expected a sim:// URL, got {url!r}")
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        if parts.netloc:
            line = find_line(parts.netloc)
            if line is None:
                raise SerialException(f"no simulated modem line called {parts.netloc!r}")
            if query:
                try:
                    line.set_knobs(**SimKnobs.from_mapping(query).__dict__)
                except ValueError as exc:
                    raise SerialException(str(exc)) from None
            return line, False
        try:
            return SimLine(SimKnobs.from_mapping(query)), True
        except ValueError as exc:
            raise SerialException(str(exc)) from None

    def close(self) -> None:
        if self.is_open and self.line is not None:
            # Closing a real port drops DTR (HUPCL); a modem set to &D2 hangs up.
            self.line.set_dtr(False)
            if self._owns_line:
                self.line.close()
        self.is_open = False
        super().close()

    def _reconfigure_port(self) -> None:
        pass

    def _need_line(self) -> SimLine:
        if not self.is_open or self.line is None:
            raise PortNotOpenError()
        return self.line

    @property
    def in_waiting(self) -> int:
        return self._need_line().in_waiting

    def read(self, size: int = 1) -> bytes:
        line = self._need_line()
        timeout = self._timeout
        if timeout == 0:
            return line.read(size, 0)
        data = bytearray()
        # Like a real port: return as soon as size bytes are in, or when the timeout ends.
        deadline = None if timeout is None else time.monotonic() + timeout
        while len(data) < size:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            chunk = line.read(size - len(data), remaining)
            if not chunk and not self.is_open:
                break
            data += chunk
        return bytes(data)

    def write(self, data: bytes) -> int:
        line = self._need_line()
        payload = bytes(data)
        line.write(payload)
        return len(payload)

    def reset_input_buffer(self) -> None:
        self._need_line().discard_output()

    def reset_output_buffer(self) -> None:
        self._need_line()

    def cancel_read(self) -> None:
        pass

    def _update_dtr_state(self) -> None:
        if self.is_open and self.line is not None:
            self.line.set_dtr(bool(self._dtr_state))

    def _update_rts_state(self) -> None:
        pass

    def _update_break_state(self) -> None:
        pass

    @property
    def cd(self) -> bool:
        return self._need_line().carrier

    @property
    def dsr(self) -> bool:
        self._need_line()
        return True

    @property
    def cts(self) -> bool:
        self._need_line()
        return True

    @property
    def ri(self) -> bool:
        self._need_line()
        return False
