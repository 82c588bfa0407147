"""Training progress: a rich progress bar on a terminal, plain lines in a log, and quiet third-party bars.

    ProgressBar     loss, lr, tokens/s and ETA, drawn on a terminal
    PlainProgress   `lorakit train > train.log` (nohup, Slurm, CI): one line every N steps, as the HF Trainer
                    and torchtune print them:

        step 12/60 (20%)  loss 1.8421  lr 9.55e-04  612 tok/s  elapsed 0:00:31  eta 0:02:04

                    N = progress_every, else a twentieth of the run (at least 1); the first and the last step
                    always print.
    quiet_third_party_progress   transformers' weight loading, huggingface_hub downloads, datasets' file
                    generation and tqdm bars are switched off when stderr is not a terminal.
"""
from __future__ import annotations

import math
import os
import sys
import time


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


def is_terminal(stream=None) -> bool:
    """Returns True when `stream` (default stdout) is an interactive terminal."""
    stream = stream if stream is not None else sys.stdout
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def default_every(total: int) -> int:
    """Returns the plain-line interval for a run of `total` steps: a twentieth of it, at least 1."""
    return max(1, total // 20)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, loss: float, lr: float, tps: float, elapsed: float,
                  done_since_start: int) -> str:
    """Returns one plain progress line (step/total, loss, lr, tokens/s, elapsed, ETA)."""
    rate = elapsed / done_since_start if done_since_start > 0 else float("nan")
    eta = _clock(rate * (total - step)) if math.isfinite(rate) else "?"
    loss_text = f"{loss:.4f}" if math.isfinite(loss) else "nan"
    return (f"step {step}/{total} ({100 * step // max(total, 1)}%)  loss {loss_text}  lr {lr:.2e}  "
            f"{tps:,.0f} tok/s  elapsed {_clock(elapsed)}  eta {eta}")


class PlainProgress:
    """Prints progress_line every `every` steps (and the first and last) to `write`; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, start: int, every: int | None = None, write=None) -> None:
        self.enabled, self.total, self.start = enabled, total, start
        self.every = every or default_every(total)
        self.write = write or (lambda line: print(line, flush=True))
        self.t0 = time.time()

    def __enter__(self):
        return self

    def __call__(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self.enabled and (step % self.every == 0 or step == self.total or step == self.start + 1):
            self.write(progress_line(step, self.total, loss, lr, tps, time.time() - self.t0, step - self.start))

    def __exit__(self, *exc) -> None:
        return None


def quiet_third_party_progress(force: bool = False) -> bool:
    """Switches off transformers', huggingface_hub's, datasets' and tqdm's progress bars when stderr is not a
    terminal (or `force`); returns True when it did. lorakit's own progress is not affected."""
    if not force and is_terminal(sys.stderr):
        return False
    # Read when each library is imported (transformers takes huggingface_hub's setting); those already
    # imported are told directly. Nothing is imported here, so calling this costs nothing.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it for every bar it creates
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    return True
