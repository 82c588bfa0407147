"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    out/checkpoints/step-000120/
        adapter/                  the adapter so far, PEFT format (loadable by `lorakit generate` and peft)
        trainable.safetensors     every trainable tensor by its parameter name (exact resume)
        optimizer.pt              AdamW state            \
        scheduler.pt              LR schedule state       > torch.save; read back with weights_only=True
        rng.pt                    python/numpy/torch RNG /
        state.json                step, data position (epoch, batch index), tokens seen, run facts
        complete                  written last: a folder without it is never resumed from

The folder is built in a temporary sibling and renamed into place (lorakit.io.atomic_write_dir), so a crash
leaves the previous checkpoint intact and at worst a hidden temporary folder.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import ConfigError, LorakitError
from lorakit.io import atomic_write_dir, save_adapter
from lorakit.train.batching import DataPosition
from lorakit.train.runtime import RUNS, rng_state, set_rng_state

CHECKPOINTS = "checkpoints"
COMPLETE = "complete"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(LorakitError):
    """A checkpoint is missing, incomplete, or does not fit this run."""


def checkpoint_dir(out: str | Path, step: int) -> Path:
    """Returns out/checkpoints/step-XXXXXX for `step`."""
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(out: str | Path, step: int, model: nn.Module, optimizer, scheduler, position: DataPosition,
                    state: dict | None = None, adapter_name: str = "default") -> Path:
    """Writes the checkpoint for `step` atomically (the `complete` marker last); returns its folder."""
    trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    info = {"step": step, "epoch": position.epoch, "batch_index": position.index, **(state or {})}

    def write(tmp: Path) -> None:
        save_adapter(model, tmp / "adapter", adapter_name)
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (tmp / COMPLETE).write_text("ok\n")

    return atomic_write_dir(checkpoint_dir(out, step), write)


def list_checkpoints(out: str | Path) -> list[Path]:
    """Returns the step-XXXXXX folders under out/checkpoints, oldest first (complete or not)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def is_complete(folder: str | Path) -> bool:
    """Returns True when a checkpoint folder has its `complete` marker and every file it needs."""
    f = Path(folder)
    needed = (COMPLETE, "state.json", "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt")
    return all((f / n).is_file() for n in needed)


def find_latest_checkpoint(out: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """Returns the newest complete checkpoint under `out`, telling `log` about incomplete ones it skips."""
    for folder in reversed(list_checkpoints(out)):
        if is_complete(folder):
            return folder
        log(f"skipping incomplete checkpoint {folder} (no '{COMPLETE}' marker or missing files)")
    return None


def prune_checkpoints(out: str | Path, keep: int) -> None:
    """Deletes all but the newest `keep` complete checkpoints (keep=0 keeps everything)."""
    if keep <= 0:
        return
    complete = [p for p in list_checkpoints(out) if is_complete(p)]
    for folder in complete[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer, scheduler) -> tuple[dict, DataPosition]:
    """Restores weights, optimizer, scheduler and RNG from `folder`; returns (state.json, data position)."""
    f = Path(folder)
    if not is_complete(f):
        raise CheckpointError(f"checkpoint {f} is incomplete (no '{COMPLETE}' marker or missing files); "
                              f"resume from an earlier one")
    tensors = load_file(str(f / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise CheckpointError(f"checkpoint {f} does not fit this model/LoRA setup: "
                              f"missing {missing[:3]}, unexpected {unknown[:3]} (were the LoRA options changed?)")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise CheckpointError(f"checkpoint {f}: {name} has shape {tuple(t.shape)}, the model has "
                                      f"{tuple(params[name].shape)} (were the LoRA options changed?)")
            params[name].copy_(t.to(params[name].dtype))
    try:
        optimizer.load_state_dict(torch.load(f / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(f / "scheduler.pt", weights_only=True))
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {f}: optimizer/scheduler state does not fit this run ({e})") from None
    set_rng_state(torch.load(f / "rng.pt", weights_only=True))
    state = json.loads((f / "state.json").read_text())
    return state, DataPosition(int(state["epoch"]), int(state["batch_index"]))


def resolve_resume(resume: str | None, out: str | None, log=print) -> tuple[Path | None, Path | None]:
    """Returns (output folder, checkpoint folder) for --resume: 'latest', a run folder, or a checkpoint folder."""
    if not resume:
        return (Path(out) if out else None), None
    if resume == "latest":
        run = Path(out) if out else None
        if run is None:
            runs = sorted((p for p in RUNS.glob("*") if (p / "checkpoints").is_dir()), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise ConfigError("--resume: no run with checkpoints in runs/; pass --out FOLDER of the run to resume")
            run = runs[-1]
    else:
        run = Path(resume)
        if not run.exists():
            raise ConfigError(f"--resume: {run} does not exist")
        if (run / "state.json").exists() or (run / "complete").exists():  # a checkpoint folder itself
            return run.parent.parent, run
    ckpt = find_latest_checkpoint(run, log)
    if ckpt is None:
        raise ConfigError(f"--resume: no complete checkpoint in {run / 'checkpoints'}")
    return run, ckpt
