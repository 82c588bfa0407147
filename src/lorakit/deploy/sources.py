"""Where the inputs of a deploy command are: the base checkpoint's files and the adapter folder.

A base is the embedded default (None, "default", "smollm2"), a .gguf file (both converted once to a cached
safetensors folder by lorakit.models), a transformers folder, or a hub id already in the local HF cache.
An adapter is given as the adapter folder itself, a checkpoint folder (runs/X/checkpoints/step-N, holding
adapter/), or a run folder (runs/X, holding adapter/ when the run finished, else its latest checkpoint).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import ModelLoadError
from lorakit.io.adapter_paths import resolve_adapter_dir

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def base_folder(spec: str | os.PathLike | None) -> Path:
    """Returns the local transformers folder (config.json + safetensors) of a base model spec."""
    from lorakit.loading.pretrained import cached_gguf_folder, embedded_model_path

    if spec is None or str(spec).lower() in ("default", "smollm2"):
        return cached_gguf_folder(embedded_model_path())
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a transformers model folder or a .gguf file.")
        return cached_gguf_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json; it is not a transformers model folder.")
        return path
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(spec), local_files_only=True))
    except Exception:
        raise ModelLoadError(f"base model {spec} is neither a local folder, a .gguf file, nor a model in the local "
                             f"Hugging Face cache. Pass a local folder (config.json + *.safetensors).") from None


@dataclass
class Checkpoint:
    """The safetensors files of a model folder: shard file name -> tensor names, and each tensor's shape/dtype."""
    folder: Path
    config: dict
    shards: dict[str, list[str]]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)   # safetensors dtype names: F32, BF16, F16

    @property
    def sharded(self) -> bool:
        return (self.folder / INDEX_NAME).is_file()


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Lists the shards and tensors of a model folder from the headers only (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder / 'config.json'} cannot be read: {e}") from None
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a safetensors index (weight_map): {e}") from None
        shards: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(file, []).append(name)
    elif (folder / SINGLE_NAME).is_file():
        shards = {SINGLE_NAME: []}
    else:
        found = sorted(p.name for p in folder.glob("*.safetensors"))
        if not found:
            raise ModelLoadError(f"{folder} holds no safetensors weights ({SINGLE_NAME} or {INDEX_NAME}); "
                                 f"convert the checkpoint to safetensors first.")
        shards = {f: [] for f in found}
    ckpt = Checkpoint(folder, config, {})
    for file, names in shards.items():
        path = folder / file
        if not path.is_file():
            raise ModelLoadError(f"shard {file} named in {index.name} is missing from {folder}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                for k in keys:
                    sl = f.get_slice(k)
                    ckpt.shapes[k] = tuple(sl.get_shape())
                    ckpt.dtypes[k] = sl.get_dtype()
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"shard {path} cannot be read (truncated or not safetensors?): {e}") from None
        missing = sorted(set(names) - set(keys))
        if missing:
            raise ModelLoadError(f"{index.name} places {missing[:3]} in {file}, which does not hold them.")
        ckpt.shards[file] = keys
    return ckpt


def resolve_adapter(path: str | os.PathLike) -> Path:
    """Returns the adapter folder for an adapter folder, a checkpoint folder, or a run folder."""
    return resolve_adapter_dir(path)  # the one resolver every --adapter uses (lorakit.io.adapter_paths)


def run_settings(adapter_dir: Path) -> dict:
    """Returns the run's config.yaml settings for an adapter written by `lorakit train` ({} when there is none)."""
    import yaml
    for run in (adapter_dir.parent, adapter_dir.parent.parent.parent):
        cfg = run / "config.yaml"
        if cfg.is_file():
            try:
                data = yaml.safe_load(cfg.read_text())
            except (OSError, yaml.YAMLError):
                return {}
            return data if isinstance(data, dict) else {}
    return {}
