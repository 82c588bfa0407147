"""Finding the adapter inside a folder a user points at, and keeping adapter paths inside an allowed root.

    resolve_adapter_dir(p)        p/adapter_config.json               -> p               (an adapter folder)
                                  p/state.json + p/adapter/           -> p/adapter       (a training checkpoint)
                                  p/adapter/ (a finished run)         -> p/adapter       (a run folder)
                                  p/checkpoints/step-N/ (a stopped run) -> newest complete checkpoint's adapter
    path_under_root(p, root)      p resolved (symlinks followed) must lie inside root resolved
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from lorakit.errors import AdapterFileError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STEP = re.compile(r"^step-(\d+)$")


def _is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def resolve_adapter_dir(path: str | os.PathLike) -> Path:
    """Returns the adapter folder for an adapter, checkpoint or run folder; AdapterFileError if there is none."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise AdapterFileError(f"adapter path {p} is not a folder (give an adapter, checkpoint or run folder)")
    if _is_adapter(p):
        return p
    if _is_adapter(p / "adapter"):  # a checkpoint (state.json + adapter/) or a finished run (out/adapter)
        return p / "adapter"
    steps = p / "checkpoints"
    if steps.is_dir():
        found = sorted(((int(m.group(1)), d) for d in steps.iterdir()
                        if d.is_dir() and (m := _STEP.match(d.name))), reverse=True)
        for _, d in found:
            if (d / "complete").is_file() and _is_adapter(d / "adapter"):
                return d / "adapter"
    raise AdapterFileError(f"{p} holds no adapter: expected {ADAPTER_CONFIG} in it, in {p / 'adapter'}, or in a "
                           f"complete checkpoint under {steps}")


def path_under_root(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Returns `path` resolved if it lies inside `root` (both resolved, symlinks followed); ConfigError otherwise."""
    base = Path(root).expanduser().resolve()
    p = Path(path).expanduser()
    resolved = (p if p.is_absolute() else base / p).resolve()
    if resolved != base and base not in resolved.parents:
        raise ConfigError(f"adapter path {path} is outside the adapter root")
    return resolved


def require_safetensors(folder: Path) -> Path:
    """Returns `folder` if its adapter weights are a safetensors file; AdapterFileError otherwise (no pickles)."""
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterFileError(f"{folder} has no {ADAPTER_WEIGHTS}; only safetensors adapters are loaded")
    return folder
