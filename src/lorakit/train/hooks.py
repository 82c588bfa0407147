"""Hooks: what code outside the recipe may watch or decide while a run trains (search pruning, bench timing).

    run_steps:  on_train_start ─► [ step ─► on_step_end ─► (eval ─► on_eval) ─► should_stop? ]* ─► on_train_end
    finish:     final eval ─► on_eval

Every method gets the running Recipe (its attributes: o, model, data, optimizer, step, metrics, results ...).
"""
from __future__ import annotations


class Hooks:
    """Does nothing: subclass it and override what you need."""

    def on_train_start(self, run) -> None:
        """Called once, right before the first step (model, LoRA, optimizer and data exist)."""

    def on_step_end(self, run, result) -> None:
        """Called after every optimizer step with its StepResult (run.step is the step just done)."""

    def on_eval(self, run, eval_loss: float) -> None:
        """Called after each held-out loss evaluation (every eval_every steps and the final one)."""

    def should_stop(self, run) -> bool:
        """Returns True to end training after this step (the run then finishes normally)."""
        return False

    def on_train_end(self, run) -> None:
        """Called once after the last step, before the final evaluation."""
