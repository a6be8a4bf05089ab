"""The one progress bar: rich, on stderr (stdout carries only results, for shell pipelines)."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def stderr_console() -> Console:
    """A rich console on stderr."""
    return Console(stderr=True)


@contextlib.contextmanager
def progress(label: str, total: int, unit: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A bar ``label ━━━ done/total unit``; yields ``advance(n)``. Disabled bars print nothing."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit), TimeRemainingColumn()]
    with Progress(*columns, console=stderr_console(), disable=not enabled) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n=1: bar.advance(task, n)
