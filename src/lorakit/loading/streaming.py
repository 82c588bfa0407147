"""Load a big model without ever holding it in full precision: build it empty, fill it one tensor at a time.

    config.json  ->  model built with every parameter on the meta device (no memory; buffers are real)
    for each module, in order:   read its tensors from the checkpoint (one at a time, lorakit.loading.
                                 checkpoint_files), check shape,  then
                                   a target nn.Linear + quantize="nf4": quantize to NF4 + double quantization
                                                                        (lorakit.ops.nf4.quantize_linear), drop the
                                                                        full-precision weight
                                   a routed-experts 3-D tensor + "nf4": NF4 per expert (lorakit.ops.nf4_experts)
                                   anything else: cast to `dtype` (default: the checkpoint's own) on `device`
                                   an embedding table or the output head kept in its stored dtype on the CPU
                                   (mmap_tables=True, the default): a view of the file's private memory map
                                   (CheckpointFiles.mapped), as llama.cpp does: frozen, read-only, its pages in
                                   the page cache (an embedding reads only the rows of the tokens it sees);
                                   quantized with a wider dtype (fp32 compute on a CPU), they stay as stored
                                   and are upcast where used (lorakit.model.storage_dtype)
    tied parameters (lm_head = embed_tokens) share one tensor; non-persistent buffers (rotary inv_freq) are
    computed by the modules' constructors, as from_pretrained does.

quantize="nf4-gptq": the target linears stay on the meta device; the calibration rows run up to the first
decoder block, then block by block: read its linears in full precision, collect each one's XᵀX on the block's
inputs, quantize them with GPTQ, run the block again (now 4-bit) to get the next block's inputs.

Peak private memory ≈ the loaded model + one stored tensor (+ its fp32 copy inside bitsandbytes' quantizer).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.loading.checkpoint_files import CheckpointFiles, open_checkpoint
from lorakit.loading.pretrained import finish_loaded
from lorakit.model.targets import expert_modules, expert_parameters, is_router, output_head

log = logging.getLogger(__name__)

QUANTIZE_CHOICES = (None, "nf4", "nf4-gptq")
DEFAULT_SKIP = ("lm_head", "embed_tokens", "wte", "wpe", "embed_positions", "embed_out", "output")


@contextlib.contextmanager
def empty_parameters():
    """Within this block every nn.Module parameter is created on the meta device (buffers stay real)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def check_device_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Raises ModelLoadError when `device` cannot hold and compute with `dtype` (tried on a tiny tensor)."""
    try:
        x = torch.ones(2, 2, dtype=dtype, device=device)
        (x @ x + x).sum().item()
    except Exception as e:
        raise ModelLoadError(f"The device {device} cannot compute in {str(dtype).replace('torch.', '')} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); choose another "
                             f"--dtype (e.g. float32) or another device.") from None
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"The GPU {torch.cuda.get_device_name(device)} has no bfloat16 support; pass "
                             f"--dtype float16 or float32.")


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "auto": None}
    if str(dtype).lower() not in names:
        raise ConfigError(f"dtype={dtype!r}; choose one of float32, bfloat16, float16 or auto (the checkpoint's)")
    return names[str(dtype).lower()]


def _head_ids(model: nn.Module) -> set[int]:
    head = output_head(model)
    return {id(head)} if head is not None else set()


def quantize_targets(model: nn.Module, target_modules=None, skip_modules=DEFAULT_SKIP) -> set[str]:
    """Returns the names of the plain nn.Linear modules the loader quantizes: all (target_modules=None, "all-linear")
    or those whose last name part is in target_modules, never the output head or a module named in skip_modules."""
    heads = _head_ids(model)
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [target_modules]
    wanted = None if target_modules in (None, "all-linear") else set(target_modules)
    skip = set(skip_modules or ())
    moe = bool(expert_modules(model))
    out = set()
    for name, m in model.named_modules():
        parts = name.split(".")
        if type(m) is not nn.Linear or id(m) in heads or skip & set(parts) or (moe and is_router(name, m)):
            continue  # a MoE router stays full precision, as lorakit.model.quantize keeps it
        if wanted is None or parts[-1] in wanted:
            out.add(name)
    return out


def _build_empty(config, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM
    with empty_parameters():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model


def _tied_groups(model: nn.Module) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return groups


def _expect(files: CheckpointFiles, name: str, shape: torch.Size) -> None:
    info = files.tensors[name]
    if tuple(info.shape) != tuple(shape):
        raise ModelLoadError(f"Checkpoint file {info.file}: tensor {name!r} has shape {list(info.shape)} but the "
                             f"model built from config.json expects {list(shape)}; the weights and config.json do "
                             f"not belong together.")


def _check_complete(model: nn.Module, files: CheckpointFiles, tie: bool) -> dict[str, str]:
    """Returns {model param/buffer name: checkpoint name}; raises ModelLoadError for missing or misshapen tensors."""
    found, missing = {}, []
    groups = _tied_groups(model)
    persistent = set(model.state_dict().keys())
    for names in groups.values():
        stored = [n for n in names if n in files]
        if not stored:
            missing.append(names[0])
            continue
        for n in names:
            found[n] = stored[0]
    for name, _ in model.named_buffers():
        if name in persistent and name in files:
            found[name] = name
        elif name in persistent:
            missing.append(name)
    head_ids = _head_ids(model)
    heads = {n + ".weight" for n, m in model.named_modules() if id(m) in head_ids}
    if tie:  # the head is rebuilt from the embedding by tie_weights()
        missing = [n for n in missing if n not in heads]
    if missing:
        raise ModelLoadError(f"Checkpoint in {files.folder} is missing {len(missing)} tensor(s) the model needs: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; it is incomplete or "
                             f"for another architecture.")
    shapes = dict(model.named_parameters(remove_duplicate=False))
    shapes.update(model.named_buffers())
    for n, stored in found.items():
        _expect(files, stored, shapes[n].shape)
    return found


def _table_ids(model: nn.Module) -> set[int]:
    # The big frozen tables a model reads a slice of (embeddings) or streams through once per step (the head).
    return _head_ids(model) | {id(m) for m in model.modules() if isinstance(m, nn.Embedding)}


def _materialize(model: nn.Module, files: CheckpointFiles, found: dict[str, str], quantize: str | None,
                 targets: set[str], dtype: torch.dtype | None, device: torch.device, mmap_tables: bool = False,
                 defer: set[str] = frozenset()) -> None:
    from lorakit.ops.nf4 import quantize_linear, release_freed_memory
    from lorakit.ops.nf4_experts import quantize_experts
    done: dict[str, nn.Parameter] = {}  # checkpoint name -> loaded parameter (tied weights share it)
    tables = _table_ids(model) if mmap_tables and device.type == "cpu" else set()
    for mname, module in list(model.named_modules()):
        prefix = f"{mname}." if mname else ""
        if mname in defer:
            continue
        if quantize and mname in targets:
            w = files.read(found[prefix + "weight"])
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            lin.weight = nn.Parameter(w.to(device=device, dtype=dtype or w.dtype), requires_grad=False)
            if module.bias is not None:
                b = files.read(found[prefix + "bias"])
                lin.bias = nn.Parameter(b.to(device=device, dtype=dtype or b.dtype), requires_grad=False)
            del w
            new = quantize_linear(lin, quantize, double_quant=True)
            del lin
            parent, _, child = mname.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            release_freed_memory()  # bitsandbytes' fp32 temporaries leave heap holes between 4-bit codes
            continue
        experts = set(expert_parameters(module)) if quantize else set()  # MoE 3-D tensors: NF4 per expert
        for pname, p in list(module._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            stored = found.get(prefix + pname)
            if stored is None:
                continue  # a tied head: tie_weights() below
            if stored in done:
                module._parameters[pname] = done[stored]
                continue
            t = None
            if id(module) in tables:
                kept = files.tensors[stored].torch_dtype
                if dtype in (None, kept):
                    t = files.mapped(stored)
                elif quantize and kept.is_floating_point and dtype.itemsize > kept.itemsize:
                    # QLoRA computing wider than the checkpoint (fp32 on a CPU): the table stays as stored
                    # and is upcast where it is used (lorakit.model.storage_dtype)
                    t = files.mapped(stored)

            done[stored] = module._parameters[pname] = nn.Parameter(
                _private(files.read(stored), dtype, device) if t is None else t, requires_grad=p.requires_grad)
            if pname in experts:  # as soon as read: one full-precision expert tensor alive at a time
                quantize_experts(module, pname, quantize)
                release_freed_memory()
        for bname, b in list(module._buffers.items()):
            if b is None:
                continue
            stored = found.get(prefix + bname)
            module._buffers[bname] = _private(files.read(stored), dtype, device) if stored else b.to(device)
    release_freed_memory()


class _Caught(Exception):
    """Raised by the hook that records the first decoder block's inputs (nothing after it runs)."""


def _decoder_blocks(model: nn.Module, targets: set[str]) -> tuple[str, nn.ModuleList]:
    # The ModuleList holding every target linear: the decoder blocks GPTQ walks through in order.
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(t.startswith(name + ".") for t in targets):
            return name, m
    raise ModelLoadError("quantize='nf4-gptq' while streaming: the target layers are not all inside one list of "
                         "decoder blocks; use quantize='nf4', or the whole-model loader (lorakit.quantize)")


def _read_linear(model: nn.Module, files: CheckpointFiles, found: dict[str, str], name: str,
                 dtype: torch.dtype | None, device: torch.device) -> nn.Linear:
    meta = model.get_submodule(name)
    lin = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
    w = files.read(found[name + ".weight"])
    lin.weight = nn.Parameter(w.to(device=device, dtype=dtype or w.dtype), requires_grad=False)
    if meta.bias is not None:
        b = files.read(found[name + ".bias"])
        lin.bias = nn.Parameter(b.to(device=device, dtype=dtype or b.dtype), requires_grad=False)
    return lin


@torch.no_grad()
def _gptq_by_block(model: nn.Module, files: CheckpointFiles, found: dict[str, str], targets: set[str], calibration,
                   dtype: torch.dtype | None, device: torch.device, damp: float) -> None:
    """GPTQ one decoder block at a time: the calibration rows' inputs to block i are block i-1's outputs with
    its weights already quantized (as GPTQ does), and only block i's linears are ever in full precision."""
    from lorakit.model.state import set_submodule
    from lorakit.ops.gptq import HessianCollector
    from lorakit.ops.nf4 import quantize_linear, release_freed_memory
    prefix, blocks = _decoder_blocks(model, targets)
    inputs: list[tuple[tuple, dict]] = []

    def catch(module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Caught

    was_training = model.training
    model.eval()
    hook = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for item in calibration:
            ids = torch.as_tensor(item)
            try:
                model(input_ids=(ids[None] if ids.dim() == 1 else ids).to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        hook.remove()
    for i, block in enumerate(blocks):
        mine = sorted(t for t in targets if t.startswith(f"{prefix}.{i}."))
        linears = {t: _read_linear(model, files, found, t, dtype, device) for t in mine}
        for t, lin in linears.items():
            set_submodule(model, t, lin)
        collector = HessianCollector(linears)
        try:
            for args, kwargs in inputs:
                block(*args, **kwargs)
        finally:
            collector.remove()
        for t, lin in linears.items():
            hessian = collector.h.pop(t, None) if lin.in_features % 64 == 0 else None  # GPTQ needs whole blocks
            set_submodule(model, t, quantize_linear(lin, "nf4", True, hessian=hessian, damp=damp))
        del linears, collector
        outs = []
        for args, kwargs in inputs:  # carried forward through the block as quantized
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if args:
                outs.append(((hidden,) + tuple(args[1:]), kwargs))
            else:
                outs.append((args, {**kwargs, "hidden_states": hidden}))
        inputs = outs
        release_freed_memory()
    model.train(was_training)


def _private(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    # A copy in private memory, never a view of the memory-mapped file: a checkpoint rewritten while the model
    # is in use must not change (or crash) it, and memory use should be what it seems.
    return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype, copy=True)


def stream_folder(folder: str | os.PathLike, *, quantize: str | None = None, dtype=None, calibration=None,
                  damp: float = 0.01,
                  device: str | torch.device = "cpu", target_modules=None, skip_modules=DEFAULT_SKIP,
                  trust_remote_code: bool = False, mmap_tables: bool = True) -> nn.Module:
    """Returns the causal LM in `folder` loaded tensor by tensor (see the module docstring); no tokenizer."""
    from transformers import AutoConfig
    folder = Path(folder)
    if quantize not in QUANTIZE_CHOICES:
        raise ConfigError(f"quantize={quantize!r}; the streaming loader supports {', '.join(map(str, QUANTIZE_CHOICES))}")
    dtype = _parse_dtype(dtype)
    device = torch.device(device)
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"Model folder {folder} has no config.json; it is not a transformers model folder.")
    files = open_checkpoint(folder)  # headers only: every file problem is found before any weight is read
    stored = files.stored_dtype() or torch.float32
    check_device_dtype(device, dtype or stored)
    if quantize:
        from lorakit.ops.nf4 import require_backend
        require_backend(device)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"Could not read {folder / 'config.json'}: {e}") from None
    config.dtype = dtype or stored
    model = _build_empty(config, trust_remote_code)
    tie = bool(getattr(config, "tie_word_embeddings", False) or
               getattr(getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False))
    found = _check_complete(model, files, tie)
    targets = quantize_targets(model, target_modules, skip_modules) if quantize else set()
    gptq = quantize == "nf4-gptq"
    if gptq and not calibration:
        raise ConfigError("quantize='nf4-gptq' needs calibration inputs (a list of token-id tensors); pass "
                          "calibration=..., or quantize='nf4' (round to nearest)")
    try:
        # nf4-gptq: the target linears stay on the meta device here and are read one block at a time below
        _materialize(model, files, found, None if gptq else quantize, set() if gptq else targets, dtype, device,
                     mmap_tables, defer=targets if gptq else set())
        if tie:
            model.tie_weights()
        tables = _table_ids(model) if quantize and dtype is not None else set()
        narrow = [m for m in model.modules() if id(m) in tables
                  and getattr(m, "weight", None) is not None and m.weight.dtype != dtype]
        if narrow:  # tables kept as stored (see _materialize): computed in `dtype`
            from lorakit.model.storage_dtype import keep_storage_dtype
            keep_storage_dtype(narrow, dtype)
        if gptq:
            _gptq_by_block(model, files, found, targets, calibration, dtype, device, damp)
    finally:
        files.close()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ModelLoadError(f"Checkpoint in {folder} left {len(left)} parameter(s) unloaded: {', '.join(left[:5])}")
    return model


def _resolve(spec) -> tuple[Path, str]:
    """Returns (local folder, name_or_path to record) for a load_model-style spec."""
    from lorakit.loading.pretrained import EMBEDDED_NAMES, cached_gguf_folder, embedded_model_path, hub_reachable
    if spec is None or str(spec).lower() in EMBEDDED_NAMES:
        return cached_gguf_folder(embedded_model_path()), "smollm2"
    path = Path(str(spec)).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"Model file {path} is not a .gguf file. Pass a transformers model folder "
                                 f"(with config.json) or a .gguf file.")
        return cached_gguf_folder(path), str(path.resolve())
    if path.is_dir():
        return path, str(path.resolve())
    if str(spec).startswith(("/", ".", "~")):
        raise ModelLoadError(f"Model path {spec} does not exist. Pass an existing transformers model folder, "
                             f"a .gguf file, or omit --model for the embedded default (smollm2).")
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(str(spec), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                   local_files_only=not hub_reachable())
    except Exception as e:
        raise ModelLoadError(f"'{spec}' is not a local path and could not be fetched from the Hugging Face hub "
                             f"or found in its local cache ({type(e).__name__}). Point --model at a local "
                             f"transformers folder or a .gguf file.") from None
    return Path(folder), str(spec)


def load_pretrained_streaming(spec=None, *, quantize: str | None = None, dtype=None,
                              device: str | torch.device = "cpu", target_modules=None,
                              skip_modules=DEFAULT_SKIP, trust_remote_code: bool = False, mmap_tables: bool = True,
                              calibration=None):
    """Returns (model, tokenizer) like lorakit.models.load_model, loaded tensor by tensor.

    spec: None/"default"/"smollm2", a folder with safetensors weights, a .gguf file, or a hub id (downloaded
    or from the local HF cache). quantize: None, "nf4" (NF4 + double quantization of the target linear
    layers as they are read) or "nf4-gptq" (the same format, codes chosen by GPTQ on `calibration`, a list of
    token-id tensors, one decoder block at a time with the calibration activations carried forward). dtype: storage/compute dtype of everything not quantized, and of the 4-bit
    layers' dequantized weights; None keeps the checkpoint's stored dtype (a bf16 checkpoint stays bf16).
    target_modules: None / "all-linear" or a list of module names (last name part) to quantize; skip_modules:
    name parts never quantized (embeddings and the output head by default). mmap_tables: on the CPU, embedding
    tables and the output head that keep their stored dtype are views of the checkpoint's memory map (file pages
    the kernel can drop and read again, not private memory); False copies them into private memory (do that
    when the checkpoint files may be rewritten in place while the model is in use).
    """
    from transformers import AutoTokenizer
    folder, name = _resolve(spec)
    model = stream_folder(folder, quantize=quantize, dtype=dtype, device=device, target_modules=target_modules,
                          skip_modules=skip_modules, trust_remote_code=trust_remote_code, mmap_tables=mmap_tables,
                          calibration=calibration)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelLoadError(f"Could not load the tokenizer in {folder}: {e}") from None
    return finish_loaded(model, tokenizer, name)
