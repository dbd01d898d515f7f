"""The terminal the tables go to: rich, and wide enough when stdout is a pipe or a file (rich assumes
80 columns there, which would cut the layer names)."""
from __future__ import annotations

import shutil
import sys


def console():
    from rich.console import Console

    width = None if sys.stdout.isatty() else max(140, shutil.get_terminal_size((140, 40)).columns)
    return Console(width=width)


class progress:
    """A transient rich progress bar on stderr over `total` items (a no-op when not `enabled`); used as
    `with progress(n, "verify") as advance: advance(k)`. It is gone from the terminal when the block ends,
    an error included, so an error line never shares a line with it."""

    def __init__(self, total, label: str, unit: str = "samples", enabled: bool = True):
        self.total, self.label, self.unit, self.enabled, self.bar = total, label, unit, enabled, None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=True)
        self.bar.start()
        task = self.bar.add_task(self.label, total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
