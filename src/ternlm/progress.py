"""Progress bars on stderr (rich), shown only when stderr is a terminal: a pipe or a log file gets
neither bars nor the blank lines a finished transient bar leaves."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

COUNTED = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


def stderr_console() -> Console:
    return Console(stderr=True)


def progress_bar(*columns, transient: bool = True, enabled: bool = True) -> Progress:
    """A rich Progress on stderr: `columns` as rich takes them (default: description, bar, done/total,
    time left). Only one can be shown at a time: an inner loop passes enabled=False."""
    console = stderr_console()
    return Progress(*(columns or COUNTED), console=console, transient=transient,
                    disable=not (enabled and console.is_terminal))
