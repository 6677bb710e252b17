"""What a training run reports while it runs: ``metrics.jsonl`` rows and a rich progress bar.

``metrics.jsonl`` has one JSON object per SAE per logged step (``step``, ``sae``, ``hook``,
``n_latents``, ``k``, ``tokens``, ``epoch``, ``fvu``, ``l0``, ``dead_fraction``, ``auxk_loss``, ``lr``,
``samples_per_s``). A resumed run first drops rows logged after its checkpoint, so the file reads
as if the run had never stopped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from interp.files import atomic_write_text

__all__ = ["MetricsLog", "progress_bar", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a ``metrics.jsonl`` file (a torn last line from a crash is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class MetricsLog:
    """Appends metric rows to ``metrics.jsonl``; only the writing rank has ``enabled``."""

    def __init__(self, path: Path, keep_until: int, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_until] if keep_until and path.exists() else []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self._epoch = max((r.get("epoch", 0) for r in kept), default=0)

    def write(self, rows: list[dict], bar: Any) -> None:
        """Append ``rows``, show a summary on the progress bar and log epoch rollovers."""
        if not self.enabled or not rows:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
            fh.flush()
        epoch = max(r["epoch"] for r in rows)
        if epoch > self._epoch:
            bar.log(f"data: starting epoch {epoch + 1} (the activations were all seen; rows reshuffled)")
            self._epoch = epoch
        fvu = sum(r.get("fvu", 0.0) for r in rows) / len(rows)
        dead = max(r.get("dead_fraction", 0.0) for r in rows)
        bar.describe(f"fvu {fvu:.3f} dead {dead:.1%} {rows[0]['samples_per_s']:,.0f} rows/s")


class _Bar:
    """A rich progress bar, or a stand-in when disabled that still prints :meth:`log` lines."""

    def __init__(self, progress: Progress | None, task: int | None):
        self.progress, self.task = progress, task

    def advance(self) -> None:
        """One step done."""
        if self.progress is not None:
            self.progress.advance(self.task)

    def describe(self, text: str) -> None:
        """Replace the status text next to the bar."""
        if self.progress is not None:
            self.progress.update(self.task, status=text)

    def log(self, text: str) -> None:
        """Print a line above the bar (on stderr without one; only the writing rank logs, see :class:`MetricsLog`)."""
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)


@contextmanager
def progress_bar(total: int, done: int, enabled: bool = True) -> Iterator[_Bar]:
    """A progress bar over ``total`` steps starting at ``done`` (on stderr, so stdout stays clean)."""
    if not enabled:
        yield _Bar(None, None)
        return
    columns = (TextColumn("train-sae"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("train", total=total, completed=done, status="")
        yield _Bar(progress, task)
