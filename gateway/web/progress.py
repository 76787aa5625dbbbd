"""A dial session's progress for browsers: the lines ``connect-now`` prints, kept per session.

The feed follows the daemon's session runner from start-up, so a browser that opens the
page after the session began still sees it from its first line; each line is rendered
by the same ``ProgressView`` the command line uses, so both say the same words.
"""
from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass, field
from typing import AsyncIterator

from rich.console import Console

from gateway.session.events import End, Event
from gateway.session.progress import ProgressView


@dataclass
class Run:
    """One session's lines so far, and its outcome once it ended."""
    number: int
    lines: list[str] = field(default_factory=list)
    outcome: str | None = None


class SessionFeed:
    def __init__(self) -> None:
        self.run: Run | None = None
        self.runs = 0
        self.changed = asyncio.Condition()
        self._buffer = io.StringIO()
        self._view: ProgressView | None = None
        self.closed = False

    async def follow(self, events: asyncio.Queue) -> None:
        """Take the runner's events until cancelled."""
        while True:
            event = await events.get()
            async with self.changed:
                self._take(event)
                self.changed.notify_all()

    def _take(self, event: Event) -> None:
        if self.run is None or self.run.outcome is not None:
            # The first event after an End opens a new run (a retry's Started belongs to the same one).
            self.runs += 1
            self.run = Run(self.runs)
            self._buffer = io.StringIO()
            console = Console(file=self._buffer, width=400, color_system=None, highlight=False, soft_wrap=True)
            self._view = ProgressView(console)
        self._view(event)
        text, self._buffer = self._buffer.getvalue(), io.StringIO()
        self._view.out.file = self._buffer
        self.run.lines.extend(line for line in text.splitlines() if line.strip())
        if isinstance(event, End):
            self.run.outcome = event.outcome

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    async def lines(self, since_run: int = 0) -> AsyncIterator[tuple[str, str]]:
        """("line", text) for each line of the current or next run after ``since_run``,
        then ("end", outcome); waits for lines as they come."""
        async with self.changed:
            await self.changed.wait_for(lambda: self.closed or (self.run is not None
                                                                and self.run.number > since_run))
        run, sent = self.run, 0
        while run is not None:
            async with self.changed:
                await self.changed.wait_for(lambda: self.closed or len(run.lines) > sent
                                            or run.outcome is not None)
                fresh, outcome = run.lines[sent:], run.outcome
            for line in fresh:
                yield "line", line
            sent += len(fresh)
            if outcome is not None or self.closed:
                yield "end", outcome or "interrupted"
                return
