"""Where the adapter is: every `--adapter PATH` takes a run folder, a checkpoint folder or an adapter folder.

    PATH                                          resolve_adapter_dir(PATH)
    ------------------------------------------    -----------------------------------------------------------
    runs/mine/adapter/  (adapter_config.json)     runs/mine/adapter            an adapter folder: itself
    runs/mine/checkpoints/step-000120/            .../step-000120/adapter      a checkpoint folder: its adapter/
    runs/mine/          (what --out named)        runs/mine/adapter            a finished run: its final adapter
    runs/mine/          (stopped, no adapter/)    the newest complete checkpoint's adapter/

A PATH that is none of these raises AdapterFileError listing every place that was looked at. The layouts are
those written by `lorakit train` (lorakit.train.recipe) and its checkpoints (lorakit.train.checkpoint):
a checkpoint is complete when its `complete` marker exists (it is written last).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from lorakit.errors import AdapterFileError

ADAPTER_CONFIG = "adapter_config.json"  # the PEFT file that makes a folder an adapter folder
RUN_ADAPTER = "adapter"                 # out/adapter: the final adapter of a run
CHECKPOINTS = "checkpoints"             # out/checkpoints/step-NNNNNN/adapter
COMPLETE = "complete"                   # a checkpoint's last-written marker
RUN_CONFIG = "config.yaml"              # out/config.yaml: the run's options
_STEP = re.compile(r"^step-(\d+)$")

__all__ = ["resolve_adapter_dir", "run_dir_of", "ADAPTER_CONFIG"]


def _is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def _complete_checkpoints(run: Path) -> list[Path]:
    """Returns run/checkpoints/step-N folders with a `complete` marker and an adapter, newest first."""
    root = run / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found, reverse=True) if (p / COMPLETE).is_file() and _is_adapter(p / RUN_ADAPTER)]


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """Returns the adapter folder that `path` (an adapter, checkpoint or run folder) stands for.

    Order: `path` itself when it holds adapter_config.json; then `path`/adapter (a run's final adapter, or a
    checkpoint's adapter); then the newest complete `path`/checkpoints/step-N/adapter (a run that stopped
    before its end). Raises AdapterFileError naming each place looked at when none holds an adapter.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise AdapterFileError(f"--adapter {p} does not exist (give an adapter folder, a run folder written by "
                               f"`lorakit train --out`, or a checkpoint folder)")
    if not p.is_dir():
        raise AdapterFileError(f"{p} is a file; an adapter is a folder holding {ADAPTER_CONFIG} and "
                               f"adapter_model.safetensors (a run folder or a checkpoint folder works too)")
    if _is_adapter(p):
        return p
    if _is_adapter(p / RUN_ADAPTER):
        return p / RUN_ADAPTER
    checkpoints = _complete_checkpoints(p)
    if checkpoints:
        return checkpoints[0] / RUN_ADAPTER
    raise AdapterFileError(
        f"--adapter {p}: not an adapter folder, nor a run or checkpoint folder with one. Looked for {p / ADAPTER_CONFIG} (an adapter folder), "
        f"{p / RUN_ADAPTER / ADAPTER_CONFIG} (a finished run or a checkpoint) and "
        f"{p / CHECKPOINTS}/step-*/{RUN_ADAPTER}/{ADAPTER_CONFIG} with a '{COMPLETE}' marker (a stopped run).")


def run_dir_of(adapter_dir: str | os.PathLike) -> Path | None:
    """Returns the run folder (holding config.yaml) an adapter folder belongs to, or None for a lone adapter.

    out/adapter -> out;  out/checkpoints/step-N/adapter -> out.
    """
    a = Path(adapter_dir)
    for run in (a.parent, a.parent.parent.parent):
        if (run / RUN_CONFIG).is_file():
            return run
    return None
