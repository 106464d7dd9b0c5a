"""Every progress display of the CLI, drawn by `rich` on stderr, on a terminal only.

`relay export` counts (`exported: 12,345 (4,100/s)`); `relay replay` and `relay batch submit`
know a total and draw a bar with the count, rate and time left.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.text import Text

REFRESH_PER_SECOND = 10


class RateColumn(ProgressColumn):
    """`(4,100/s)`: items per second over the whole run so far."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"({rate:,.0f}/s)")


class CountColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{int(task.completed):,}")


class Progress:
    """A count, or a bar once `total` (read at each update: a replay learns it from its plan)
    is known. Call it with the number of items just done; `close()` draws the final state."""

    def __init__(self, label: str, quiet: bool, total: Callable[[], int] | None = None):
        self.total = total
        self.enabled = not quiet and sys.stderr.isatty()
        self.count = 0
        columns: list[ProgressColumn] = [TextColumn(f"{label}:")]
        if total is not None:
            columns += [BarColumn(bar_width=20), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn()]
        else:
            columns += [CountColumn(), RateColumn()]
        console = Console(file=sys.stderr, force_terminal=self.enabled or None)
        self.bar = RichProgress(
            *columns, console=console, disable=not self.enabled, refresh_per_second=REFRESH_PER_SECOND
        )
        self.task = self.bar.add_task(label, total=None)
        if self.enabled:
            self.bar.start()

    def __call__(self, n: int) -> None:
        self.count += n
        self.set(self.count)

    def set(self, done: int, total: int | None = None) -> None:
        """Show `done` items (of `total`, or of the `total` callable's answer)."""
        self.count = done
        known = total if total is not None else (self.total() if self.total is not None else None)
        self.bar.update(self.task, completed=done, total=known or None)

    def close(self) -> None:
        if self.enabled:
            self.bar.refresh()
            self.bar.stop()
