"""The harvest progress bar: tokens stored, tokens/s and ETA (rich), or nothing when disabled."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

__all__ = ["harvest_progress"]


class _TokensPerSecond(ProgressColumn):
    """Throughput of this run (resumed tokens are not counted as fast work)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="progress.data.speed")


@contextlib.contextmanager
def harvest_progress(enabled: bool, total: int, done: int) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n_tokens)``; shows a bar from ``done`` to ``total`` tokens when ``enabled``."""
    if not enabled:
        yield lambda n: None
        return
    columns = [
        TextColumn("harvest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        _TokensPerSecond(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("harvest", total=total, completed=done)
        yield lambda n: bar.advance(task, n)
