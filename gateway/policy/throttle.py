"""Password guessing over SMTP AUTH, POP3 and the web console: failed logins are answered slowly, then refused.

Per client address: each failure within the window delays the answer a little more;
``max_failures`` failures within ``lockout`` seconds lock the address out for
``lockout`` seconds, during which even the right password is refused.  A successful
login clears the address's record.

The limit holds under concurrency: a login *reserves* an attempt before its password is
checked, and an address may have at most ``max_failures`` attempts failed or in flight,
so 300 guesses sent at once check at most ``max_failures`` passwords; a right password
whose check finishes after the address was locked out is refused all the same.
"""
from __future__ import annotations

import time
from collections.abc import Callable

FAILURE_DELAY = 0.25  # seconds added per recent failure
MAX_DELAY = 1.0
_PRUNE_AT = 1024  # addresses remembered before stale ones are forgotten


class LoginThrottle:
    def __init__(self, max_failures: int, lockout: float, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.lockout = lockout
        self.clock = clock
        self._failures: dict[str, list[float]] = {}
        self._locked_until: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}

    def reserve(self, address: str) -> bool:
        """Take one attempt for ``address`` before checking its password; False when the
        address is locked out or its attempts in flight would pass the limit."""
        if self.locked_out(address):
            return False
        now = self.clock()
        recent = [t for t in self._failures.get(address, ()) if now - t < self.lockout]
        if len(recent) + self._in_flight.get(address, 0) >= self.max_failures:
            return False
        self._in_flight[address] = self._in_flight.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        """An attempt reserved but never decided (the client went away)."""
        n = self._in_flight.get(address, 0) - 1
        if n > 0:
            self._in_flight[address] = n
        else:
            self._in_flight.pop(address, None)

    def locked_out(self, address: str) -> bool:
        until = self._locked_until.get(address)
        if until is None:
            return False
        if self.clock() >= until:
            del self._locked_until[address]
            self._failures.pop(address, None)
            return False
        return True

    def failed(self, address: str) -> float:
        """Record a failed login (and end its reservation, if it had one); returns how long
        to wait before answering."""
        if address in self._in_flight:
            self.release(address)
        now = self.clock()
        recent = [t for t in self._failures.get(address, ()) if now - t < self.lockout]
        recent.append(now)
        self._failures[address] = recent
        if len(recent) >= self.max_failures:
            self._locked_until[address] = now + self.lockout
        if len(self._failures) > _PRUNE_AT:
            self._prune(now)
        return self.delay(address)

    def delay(self, address: str) -> float:
        if self.locked_out(address):
            return MAX_DELAY
        return min(FAILURE_DELAY * len(self._failures.get(address, ())), MAX_DELAY)

    def succeeded(self, address: str) -> bool:
        """A right password: clears the address's record, unless the address was locked out
        while the check ran; then False, and the login must be refused."""
        if address in self._in_flight:
            self.release(address)
        if self.locked_out(address):
            return False
        self._failures.pop(address, None)
        return True

    def _prune(self, now: float) -> None:
        for address in [a for a, times in self._failures.items() if now - times[-1] >= self.lockout]:
            if address not in self._locked_until:
                del self._failures[address]


class SharedLockout:
    """One login door counted against several throttles (the web console's against SMTP's
    and POP3's): a failure here is a failure on each, and a lockout on any locks it, so a
    guesser gains no tries by switching protocols."""

    def __init__(self, *throttles: LoginThrottle):
        self.throttles = throttles

    def reserve(self, address: str) -> bool:
        taken = []
        for t in self.throttles:
            if not t.reserve(address):
                for done in taken:
                    done.release(address)
                return False
            taken.append(t)
        return True

    def release(self, address: str) -> None:
        for t in self.throttles:
            t.release(address)

    def locked_out(self, address: str) -> bool:
        return any(t.locked_out(address) for t in self.throttles)

    def failed(self, address: str) -> float:
        return max(t.failed(address) for t in self.throttles)

    def delay(self, address: str) -> float:
        return max(t.delay(address) for t in self.throttles)

    def succeeded(self, address: str) -> bool:
        # Every throttle must hear of the success (each ends its reservation), so no short-circuit.
        return all([t.succeeded(address) for t in self.throttles])
