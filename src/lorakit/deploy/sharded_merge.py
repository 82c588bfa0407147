"""Merge an adapter into a base checkpoint shard by shard: the merged model is written in the base's sharding
(and dtype, unless told otherwise), holding one shard in memory at a time.

Each base shard is read tensor by tensor (safetensors, memory-mapped), the adapter's update is added in fp32
(deploy.deltas), and the tensor is appended to its output shard (header first, written from the plan) in a
temporary folder; the index, config and tokenizer files follow,
and the folder is renamed into place (lorakit.io.atomic_write_dir), so a failure leaves nothing half-written.

An adapter trained on an NF4-quantized base (QLoRA) is merged into the ORIGINAL full-precision weights here:
merging into dequantized 4-bit weights changes outputs (peft#2321). The message says which was done.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from lorakit.deploy.deltas import AdapterUpdates, NotStreamableError
from lorakit.deploy.output import check_disk
from lorakit.deploy.sources import INDEX_NAME, Checkpoint, read_checkpoint, resolve_adapter, run_settings
from lorakit.errors import LorakitError

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_ST_DTYPE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
_SKIP = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")


def merged_tensors(ckpt: Checkpoint, updates: AdapterUpdates | None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yields (shard file, tensor name, tensor) for every base tensor, in file order, with the adapter folded in
    (fp32 for the tensors it touches, the stored dtype otherwise). One tensor is read at a time."""
    from safetensors import safe_open

    for file, names in ckpt.shards.items():
        with safe_open(str(ckpt.folder / file), framework="pt") as f:
            for name in names:
                t = f.get_tensor(name)
                yield file, name, (updates.apply(name, t) if updates is not None and updates.touches(name) else t)


def load_updates(adapter: str | None, ckpt: Checkpoint, allow_pickle: bool = False, log=print) -> AdapterUpdates | None:
    """Reads and checks the adapter against the checkpoint; says when it was trained on a quantized base."""
    if adapter is None:
        return None
    folder = resolve_adapter(adapter)
    updates = AdapterUpdates(folder, allow_pickle=allow_pickle)
    shapes = dict(ckpt.shapes)
    if ckpt.config.get("tie_word_embeddings") and "lm_head.weight" not in shapes:
        if "lm_head.weight" in updates.updates or "lm_head.weight" in updates.replacements:
            raise NotStreamableError("the adapter trains lm_head, but this base model ties it to the input embeddings "
                                     "(tie_word_embeddings): the tensor-by-tensor merge cannot untie them.")
    updates.check(shapes, f"the base checkpoint {ckpt.folder}")
    quant = str(run_settings(folder).get("quantize") or "none")
    if quant.startswith("nf4"):
        log(f"note: the adapter was trained on an {quant}-quantized base (QLoRA); it is merged into the original "
            f"full-precision weights, not the 4-bit ones (merging into dequantized 4-bit weights changes outputs, "
            f"peft#2321). `lorakit merge --quantize nf4` merges into the NF4-rounded weights instead.")
    return updates


def _out_dtype(ckpt: Checkpoint, name: str, dtype: torch.dtype | None) -> torch.dtype:
    stored = _ST_DTYPE.get(ckpt.dtypes[name])
    if stored is None or not stored.is_floating_point:
        return stored or torch.float32
    return dtype or stored


def merge_sharded(base: str | Path, adapter: str | None, out: str | Path, dtype: str | None = None,
                  allow_pickle: bool = False, log: Callable[[str], None] = print) -> Path:
    """Writes base + adapter as a safetensors folder with the base's shard layout; returns the folder path.

    dtype: "bf16", "fp16", "fp32" (or torch names), or None for each tensor's stored dtype.
    """
    from lorakit.io import atomic_write_dir, check_output_dir

    out = Path(out)
    check_output_dir(out)
    ckpt = read_checkpoint(base)
    if dtype is not None and dtype not in DTYPES:
        raise LorakitError(f"--dtype {dtype}: choose bf16, fp16 or fp32")
    target = DTYPES.get(dtype) if dtype else None
    updates = load_updates(adapter, ckpt, allow_pickle, log)
    need = sum(_numel(s) * _out_dtype(ckpt, n, target).itemsize for n, s in ckpt.shapes.items())
    check_disk(out.parent if out.parent.exists() else Path("."), need, "the merged model")

    def write(tmp: Path) -> None:
        current, fh = None, None
        try:
            for file, name, t in merged_tensors(ckpt, updates):
                if file != current:
                    if fh is not None:
                        fh.close()
                    current = file
                    fh = open(tmp / file, "wb")
                    _write_header(fh, ckpt, ckpt.shards[file], target)
                fh.write(t.to(_out_dtype(ckpt, name, target)).contiguous().view(torch.uint8).numpy().tobytes())
        finally:
            if fh is not None:
                fh.close()
        if ckpt.sharded:
            index = json.loads((ckpt.folder / INDEX_NAME).read_text())
            index["metadata"] = {**index.get("metadata", {}), "total_size": need}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        for f in ckpt.folder.iterdir():
            if f.is_file() and not f.name.endswith(_SKIP) and f.name != INDEX_NAME:
                shutil.copy2(f, tmp / f.name)
        if target is not None:
            cfg = dict(ckpt.config)
            cfg["dtype"] = str(target).replace("torch.", "")
            cfg.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    path = atomic_write_dir(out, write)
    what = "base with the adapter folded in" if updates is not None else "base model (no adapter)"
    log(f"merged model written to {path} ({need / 1e6:.0f} MB, {dtype or 'the base dtype'}, "
        f"{len(ckpt.shards)} shard(s)): {what}; load it with transformers.AutoModelForCausalLM.from_pretrained('{path}')")
    return path


_ST_NAME = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _write_header(fh, ckpt: Checkpoint, names: list[str], target: torch.dtype | None) -> None:
    """Writes a safetensors header for `names` (in that order); the tensors' bytes follow one at a time, so a
    shard is streamed to disk instead of being serialized in memory (safetensors.save_file builds it whole)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for n in names:
        dt = _out_dtype(ckpt, n, target)
        size = _numel(ckpt.shapes[n]) * dt.itemsize
        header[n] = {"dtype": _ST_NAME[dt], "shape": list(ckpt.shapes[n]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fh.write(len(raw).to_bytes(8, "little"))
    fh.write(raw)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
