"""The training progress bar (rich): loss, lr, tokens/s and ETA."""
from __future__ import annotations

import math


class ProgressBar:
    """A rich progress bar (loss, lr, tokens/s, ETA) as a context manager; calling it updates the bar."""

    def __init__(self, enabled: bool, total: int, start: int, console=None) -> None:
        self.enabled, self.total, self.start, self.console = enabled, total, start, console

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.p = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                              TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
                              TimeRemainingColumn(), console=self.console, transient=False)
            self.p.__enter__()
            self.task = self.p.add_task("train", total=self.total, completed=self.start, loss="-", lr="-", tps="-")
        return self

    def __call__(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self.enabled:
            self.p.update(self.task, completed=step, loss=f"{loss:.4f}" if math.isfinite(loss) else "nan",
                          lr=f"{lr:.2e}", tps=f"{tps:,.0f}")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.p.__exit__(*exc)
