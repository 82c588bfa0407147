"""Keeping adapter paths a server loads inside an allowed root, and safetensors only.

    path_under_root(p, root)      p resolved (symlinks followed) must lie inside root resolved
    require_safetensors(folder)   the adapter's weights are adapter_model.safetensors (never a pickle)

Which folder holds the adapter (adapter, checkpoint or run folder) is lorakit.io.adapter_paths.resolve_adapter_dir.
"""
from __future__ import annotations

import os
from pathlib import Path

from lorakit.errors import AdapterFileError, ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
