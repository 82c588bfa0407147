"""QLoRA's frozen base: NF4 weights with double quantization, via bitsandbytes `Linear4bit`.

    W0 (fp32, d×k)  --quantize-->  4-bit codes (d·k/2 bytes)  +  absmax per 64 weights (uint8, double-quant)
                                   +  absmax of those per 256 blocks (fp32)      ≈ 4.127 bits per weight
    forward:  h = dequant(W0)·x + s·B·(A·x)        only A and B train (fp32)

`quantize(model)` swaps nn.Linear layers (not embeddings, norms or the output head) for `Linear4bit`, before
or after `lorakit.inject`. `dequantize_weight` / `requantize_weight` are what LoraLinear calls to merge into a
4-bit base; `merge_and_unload_quantized` folds adapters into a dequantized model (default) or re-quantizes
and reports the logit change that costs. `memory_report` counts bytes the way training will spend them.
"""
from __future__ import annotations

import functools
import logging
import threading
import warnings

import torch
from torch import nn

from lorakit.errors import ConfigError, LorakitError

QUANT_TYPES = ("nf4", "fp4")


class QuantizationBackendError(LorakitError):
    """4-bit quantization was requested but no backend can run it (package missing or device unsupported)."""


class RequantizationWarning(UserWarning):
    """Re-quantizing merged weights changed the model's outputs (the message says by how much)."""


# ---------------------------------------------------------------------------- backend
_checked_devices: set[str] = set()


def require_backend(device: torch.device | str = "cpu"):
    """Returns the bitsandbytes module after checking it can quantize on `device`; raises QuantizationBackendError."""
    device = torch.device(device)
    # bitsandbytes logs a warning at import when the optional `kernels` package (a bf16 CPU inference kernel
    # lorakit does not use, see quantize_linear) is missing; that is noise to a lorakit user.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional  # noqa: F401  (quantize_4bit lives here)
        from bitsandbytes.nn import Linear4bit, Params4bit  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library raising at import
        raise QuantizationBackendError(
            f"4-bit quantization needs the 'bitsandbytes' package (>= 0.48 for CPU), which could not be imported "
            f"({type(e).__name__}: {e}); install it with `pip install bitsandbytes`, or train without --quantize") from e
    if device.type not in _checked_devices:
        # A tiny round trip finds a missing CPU/CUDA kernel now, with a clear message, not mid-training.
        try:
            w = torch.randn(64, 64, device=device)
            q, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
            bnb.functional.dequantize_4bit(q, state)
        except Exception as e:
            raise QuantizationBackendError(
                f"bitsandbytes {getattr(bnb, '__version__', '?')} has no working 4-bit backend for device "
                f"{device.type!r} ({type(e).__name__}: {e}); use a bitsandbytes build with {device.type} support "
                f"(CPU needs >= 0.48), another device, or train without --quantize") from e
        _checked_devices.add(device.type)
    return bnb


def is_quantized_layer(module: nn.Module) -> bool:
    """Returns True when `module` is a bitsandbytes 4-bit linear layer (Linear4bit or a subclass)."""
    return type(getattr(module, "weight", None)).__name__ == "Params4bit"


# ---------------------------------------------------------------------------- which layers
def _named_in(name: str, spec: str) -> bool:
    # "mlp" skips model.layers.0.mlp.up_proj; "layers.0" skips everything under layer 0; whole dotted parts only.
    return f".{spec}." in f".{name}."


def _head_modules(model: nn.Module) -> set[int]:
    get = getattr(model, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        head = None
    ids = {id(head)} if head is not None else set()
    ids |= {id(m) for n, m in model.named_modules() if n.split(".")[-1] == "lm_head"}
    return ids


def _quantizable(model: nn.Module, skip) -> list[tuple[str, nn.Module, nn.Module]]:
    """Returns (name, owner, linear) for each plain nn.Linear to quantize; owner is its parent or LoRA wrapper."""
    from lorakit.layers import LoraLayer, ModulesToSave
    heads = _head_modules(model)
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, LoraLayer):
            inside.append(name + ".")  # only its base layer, never the trainable factors
            base = module.base_layer
            # Exactly nn.Linear: subclasses (e.g. attention's out_proj) are read through .weight by their owner.
            if type(base) is nn.Linear and not getattr(module, "fan_in_fan_out", False):
                found.append((name, module, base))
            continue
        if isinstance(module, ModulesToSave):
            inside.append(name + ".")  # trainable copies stay full precision
            continue
        if type(module) is nn.Linear:
            found.append((name, None, module))
    return [(n, o, m) for n, o, m in found
            if not {id(m), id(o)} & heads and not any(_named_in(n, s) for s in skip)]


# ---------------------------------------------------------------------------- quantize / dequantize layers
def quantize_linear(linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, block_size: int = 64,
                    hessian: torch.Tensor | None = None, damp: float = 0.01) -> nn.Module:
    """Returns a bitsandbytes Linear4bit holding `linear`'s weight quantized (on the same device) and its bias.

    Without `hessian`: round to nearest (bitsandbytes' quantize_4bit, as QLoRA). With `hessian` (XᵀX of the
    layer's calibration inputs): the codes are chosen by GPTQ (lorakit.gptq) to keep X·Wᵀ; same format.
    """
    device = linear.weight.device
    bnb = require_backend(device)
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type=quant_type,
                              device="meta")  # meta: no throwaway fp32 weight is allocated
    w = linear.weight.detach()
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        w = w.float()
    if hessian is None:
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, blocksize=block_size, compress_statistics=double_quant,
                                         quant_type=quant_type, module=layer)._quantize(device)
    else:
        from lorakit.gptq import gptq_codes, pack_4bit
        codes, absmax = gptq_codes(w, hessian.to(device), block_size, damp, quant_type)
        packed, state = pack_4bit(codes, absmax, w.dtype, block_size, double_quant, quant_type)
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=block_size,
                                         compress_statistics=double_quant, quant_type=quant_type, module=layer,
                                         bnb_quantized=True)
        layer.quant_state = state
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    # bitsandbytes repacks CPU weights for a bf16 inference kernel the first time it runs in eval mode: that
    # drops double quantization (+0.12 bits/param), rounds absmax to bf16 and makes eval logits differ from
    # train-mode logits. One consistent NF4 model is worth more here than that inference speed-up.
    layer.support_avx512bf16_for_cpu = False
    layer.train(linear.training)
    return layer


def _unpack_cpu_format(layer: nn.Module) -> None:
    # Undo bitsandbytes' CPU inference packing (see quantize_linear) so the canonical NF4 layout is readable.
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    weight = layer.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        layer.quant_state = weight.quant_state


def dequantize_weight(layer: nn.Module) -> torch.Tensor:
    """Returns the 4-bit layer's weight dequantized, as an fp32 (out_features, in_features) tensor."""
    bnb = require_backend(layer.weight.device)
    _unpack_cpu_format(layer)
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    return w.reshape(layer.out_features, layer.in_features).float()


@torch.no_grad()
def requantize_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Quantizes `w` (out, in), any float dtype, into the 4-bit layer in place with the layer's own settings."""
    bnb = require_backend(layer.weight.device)
    _unpack_cpu_format(layer)
    weight, old = layer.weight, layer.weight.quant_state
    w = w.to(device=weight.device, dtype=old.dtype).contiguous()
    data, state = bnb.functional.quantize_4bit(w, blocksize=old.blocksize, compress_statistics=old.nested,
                                               quant_type=old.quant_type, quant_storage=weight.data.dtype)
    weight.data, weight.quant_state = data, state
    layer.quant_state = state


class Dequantized:
    """A 4-bit weight as the fused LoRA functions read it: dequantized on demand, into one reused buffer.

    bitsandbytes' Linear4bit allocates a fresh full-precision copy of its weight on every forward and again in
    backward. The fused path (`lorakit.functional.lora_linear`) calls `dense()` right before the one GEMM that
    reads the weight, so a single per-thread buffer the size of the largest layer serves every layer in turn:
    no allocation (and no page faults) per call, and nothing full-precision is ever saved for backward.
    """

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight  # bitsandbytes Params4bit

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.quant_state.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def dense(self) -> torch.Tensor:
        """Returns the (out, in) weight dequantized into this thread's workspace (valid until the next call)."""
        state = self.weight.quant_state
        out = _workspace(torch.Size(state.shape), state.dtype, self.weight.device)
        return _dequantize_into(self.weight.data, state, out)


def _cpu_kernel(state):
    # bitsandbytes' own CPU dequantization kernel (what its dequantize_4bit op calls), which can write into a
    # given buffer; its registered op has no out= variant on CPU. None where bitsandbytes would not use it.
    return _cpu_kernel_for(state.quant_type, state.dtype, state.blocksize, len(state.shape) == 2 and
                           state.shape[-1] % 2 == 0)


@functools.lru_cache(maxsize=None)
def _cpu_kernel_for(quant_type: str, dtype: torch.dtype, blocksize: int, even_2d: bool):
    # Looked up once per kind of layer, not on every dequantization (the fused path calls it twice per step).
    try:
        from bitsandbytes.backends.cpu.ops import _has_avx512
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except Exception:
        return None
    if isinstance(lib, ErrorHandlerMockBNBNativeLibrary) or (_has_avx512 and blocksize >= 2048) or not even_2d:
        return None
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{name}", None) if name else None


def _dequantize_into(data: torch.Tensor, state, out: torch.Tensor) -> torch.Tensor:
    """Returns `out` holding dequant(data); falls back to bitsandbytes' allocating call where it cannot write there."""
    import ctypes

    from bitsandbytes.functional import dequantize_4bit, dequantize_blockwise, get_ptr
    if out.device.type != "cpu":
        dequantize_4bit(data, state, out=out)  # CUDA (and XPU, MPS) register an out= kernel
        return out
    kernel = _cpu_kernel(state)
    if kernel is None:
        return out.copy_(dequantize_4bit(data, state))
    absmax = state.absmax
    if state.nested:  # double quantization: the per-block scales are themselves 8-bit blockwise
        absmax = dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = absmax.float().contiguous()
    m, n = state.shape
    codes = data.view(torch.uint8).reshape(m, n // 2)
    kernel(get_ptr(codes), get_ptr(absmax), get_ptr(out), ctypes.c_longlong(state.blocksize), ctypes.c_longlong(m),
           ctypes.c_longlong(n))
    return out


_local = threading.local()


def _workspace(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # One flat buffer per (thread, device, dtype), grown to the largest layer seen; returned as a (out, in) view.
    pool = _local.__dict__.setdefault("pool", {})
    key = (device, dtype)
    buf = pool.get(key)
    n = shape.numel()
    if buf is None or buf.numel() < n:
        buf = pool[key] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def free_workspace() -> None:
    """Releases this thread's dequantization buffers (the fused 4-bit path allocates them again when needed)."""
    _local.__dict__.pop("pool", None)


def fused_weight(layer: nn.Module, x: torch.Tensor):
    """Returns a Dequantized view of the 4-bit `layer` when the fused LoRA path can compute it exactly for x."""
    weight = layer.weight
    state = getattr(weight, "quant_state", None)
    if (state is None or getattr(state, "packing_format_for_cpu", False) or state.dtype != x.dtype
            or getattr(layer, "compute_dtype", None) not in (None, x.dtype) or weight.device != x.device
            or (layer.bias is not None and layer.bias.dtype != x.dtype)):
        return None
    return Dequantized(weight)


def dequantize_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """Returns a plain nn.Linear with the 4-bit layer's dequantized weight (in its original dtype unless given)."""
    w = dequantize_weight(layer)
    dtype = dtype or layer.weight.quant_state.dtype
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
    linear.train(layer.training)
    return linear


def _replace(model: nn.Module, name: str, owner: nn.Module | None, new: nn.Module) -> None:
    from lorakit.layers import LoraLinear, LoraMergedLinear
    if owner is not None:  # a LoRA wrapper: swap its base layer, and re-decide whether the fused path applies
        owner.base_layer = new
        if isinstance(owner, LoraLinear) and not isinstance(owner, LoraMergedLinear):
            owner._fusable = owner.fusable_base(new)
        return
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, skip: list[str] | str | None = None,
             block_size: int = 64, calibration=None, damp: float = 0.01,
             hessian_budget: int = 256 * 2 ** 20) -> nn.Module:
    """Returns `model` with its nn.Linear layers replaced in place by 4-bit bitsandbytes Linear4bit layers.

    Embeddings, norms and the output head (`get_output_embeddings()` / `lm_head`) stay in full precision, as
    do modules whose dotted name contains an entry of `skip` and LoRA factors. Works before and after
    `lorakit.inject` (a LoRA wrapper's base layer is quantized under it). Quantization runs on each weight's
    own device: move the model to CUDA first to quantize there.

    calibration: None rounds each weight to its nearest NF4 value (QLoRA). An iterable of model inputs (token
    id tensors, or dicts of model inputs) chooses the codes with GPTQ instead (lorakit.gptq): same format and
    bits, less change in each layer's output. `hessian_budget` bounds the bytes of XᵀX held at once (layers
    are quantized a group at a time, one calibration pass per group); `damp` is GPTQ's diagonal damping.
    """
    if bits != 4:
        raise ConfigError(f"quantize: bits={bits} is not supported; lorakit quantizes frozen bases to 4 bits")
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quantize: quant_type={quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    if block_size not in (64, 128, 256, 512, 1024, 2048, 4096):
        raise ConfigError(f"quantize: block_size={block_size}; use a power of two from 64 to 4096")
    targets = _quantizable(model, skip)
    for device in {str(m.weight.device) for _, _, m in targets}:
        require_backend(device)
    if calibration is None:
        for name, owner, linear in targets:
            _replace(model, name, owner, quantize_linear(linear, quant_type, double_quant, compute_dtype, block_size))
    else:
        _quantize_gptq(model, targets, calibration, quant_type, double_quant, compute_dtype, block_size, damp,
                       hessian_budget)
    if targets:
        release_freed_memory()
    return model


def _quantize_gptq(model, targets, calibration, quant_type, double_quant, compute_dtype, block_size, damp, budget):
    from lorakit.gptq import HessianCollector, hessian_bytes, run_calibration
    calibration = list(calibration)
    if not calibration:
        raise ConfigError("quantize: calibration is empty; give some model inputs, or calibration=None")
    partial = [name for name, _, linear in targets if linear.in_features % block_size]
    if partial:  # GPTQ works on whole blocks per row; bitsandbytes' blocks of these layers straddle rows
        warnings.warn(f"quantize: {len(partial)} layer(s) have in_features not a multiple of block_size={block_size} "
                      f"(e.g. {partial[0]}); they are rounded to nearest instead of GPTQ", stacklevel=3)
    was_training = model.training
    model.eval()
    try:
        i = 0
        while i < len(targets):
            group, used = [], 0
            while i < len(targets) and (not group or used + hessian_bytes(targets[i][2]) <= budget):
                group.append(targets[i])
                used += hessian_bytes(targets[i][2])
                i += 1
            # the input reaches the LoRA wrapper (its fused path reads the base weight without calling it)
            collector = HessianCollector({name: owner if owner is not None else linear for name, owner, linear in group})
            try:
                run_calibration(model, calibration)
            finally:
                collector.remove()
            for name, owner, linear in group:
                hessian = collector.h.pop(name, None)  # None: never called on calibration data -> nearest rounding
                if name in partial:
                    hessian = None
                _replace(model, name, owner, quantize_linear(linear, quant_type, double_quant, compute_dtype,
                                                             block_size, hessian, damp))
    finally:
        model.train(was_training)


def release_freed_memory() -> bool:
    """Returns True after asking glibc to hand freed heap memory back to the OS (the full-precision weights that
    quantization replaced would otherwise stay in the process's resident memory); False off glibc."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Returns `model` with every 4-bit linear layer replaced in place by an nn.Linear (dequantized weight)."""
    from lorakit.layers import LoraLayer
    swaps = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and is_quantized_layer(module.base_layer):
            swaps.append((name, module, module.base_layer))
        elif is_quantized_layer(module) and not name.endswith("base_layer"):
            swaps.append((name, None, module))
    for name, owner, layer in swaps:
        _replace(model, name, owner, dequantize_linear(layer, dtype))
    return model


def is_quantized(model: nn.Module) -> bool:
    """Returns True when any layer of `model` has a 4-bit weight."""
    return any(is_quantized_layer(m) for m in model.modules())


# ---------------------------------------------------------------------------- merging
def _logits(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConfigError(f"merge_and_unload: cannot find logits in the model output ({type(out).__name__})")


def default_example_inputs(model: nn.Module, length: int = 32, seed: int = 0) -> torch.Tensor | None:
    """Returns fixed random token ids (1, length) for a language model (config.vocab_size), else None."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        return None
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, length), generator=g).to(device)


@torch.no_grad()
def _run(model: nn.Module, inputs) -> torch.Tensor:
    if isinstance(inputs, dict):
        return _logits(model(**inputs)).float()
    if isinstance(inputs, (tuple, list)):
        return _logits(model(*inputs)).float()
    return _logits(model(inputs)).float()


def merge_and_unload_quantized(model: nn.Module, requantize: bool = False, example_inputs=None) -> nn.Module:
    """Returns the plain model with the active adapters merged in fp32: dequantized, or re-quantized on request.

    requantize=False: every 4-bit layer becomes an nn.Linear holding dequant(W0) + s·B·A (exact merge).
    requantize=True: merged weights are quantized again; that rounds the adapter's update away in part, so a
    RequantizationWarning states the max |logit| change measured on `example_inputs` (default: fixed random
    token ids when the model has config.vocab_size; else the max weight change is reported instead).
    """
    from lorakit.inject import _replace_wrappers, lora_layers
    if not requantize:
        return _replace_wrappers(dequantize(model), do_merge=True)
    inputs = example_inputs if example_inputs is not None else default_example_inputs(model)
    was_training = model.training
    model.eval()
    before = _run(model, inputs) if inputs is not None else None
    weight_change = 0.0
    if inputs is None:  # no way to run the model: measure what re-quantization does to the weights instead
        for _, layer in lora_layers(model):
            if is_quantized_layer(layer.base_layer) and layer._live:
                exact = dequantize_weight(layer.base_layer) + sum(layer.delta_weight(n) for n in layer._live)
                weight_change = max(weight_change, (exact - _roundtrip(layer.base_layer, exact)).abs().max().item())
    model = _replace_wrappers(model, do_merge=True)  # LoraLinear merges through requantize_weight
    if before is not None:
        after = _run(model, inputs)
        diff = (after - before).abs().max().item()
        what = (f"max |logit difference| = {diff:.4g} on the example inputs "
                f"(logits span ±{before.abs().max().item():.3g})")
    else:
        what = f"max |weight difference| = {weight_change:.4g} (pass example_inputs to measure logits)"
    msg = f"merge_and_unload(requantize=True): re-quantizing the merged weights to 4 bits changes outputs: {what}"
    warnings.warn(msg, RequantizationWarning, stacklevel=2)
    model.train(was_training)
    return model


def _roundtrip(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    # What quantize→dequantize does to w with the layer's settings, leaving the layer untouched.
    bnb = require_backend(layer.weight.device)
    qs = layer.weight.quant_state
    q, state = bnb.functional.quantize_4bit(w.to(qs.dtype).contiguous(), blocksize=qs.blocksize,
                                            compress_statistics=qs.nested, quant_type=qs.quant_type)
    return bnb.functional.dequantize_4bit(q, state).float()


# ---------------------------------------------------------------------------- memory
def _nbytes(t: torch.Tensor | None) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _quant_stat_bytes(state) -> tuple[int, int]:
    """Returns (per-block statistics bytes, codebook bytes) of one bitsandbytes QuantState."""
    stats = _nbytes(state.absmax) + _nbytes(getattr(state, "offset", None))
    codes = _nbytes(state.code)
    inner = getattr(state, "state2", None) if state.nested else None
    if inner is not None:
        stats += _nbytes(inner.absmax)
        codes += _nbytes(inner.code)
    return stats, codes


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Returns bytes of frozen weights, trainable weights, grads, optimizer state, and bits per 4-bit parameter.

    Grads are counted as one per trainable parameter in its dtype (what backward will allocate). Optimizer
    state is measured from `optimizer` once it has stepped; before that (or without one) it is AdamW's two
    fp32 moments per trainable parameter. The fixed NF4 and double-quant codebooks (a few hundred floats,
    the same in every layer) are counted once per model, as a format constant.
    """
    seen: set[int] = set()
    frozen = trainable = trainable_numel = quant_params = quant_bytes = 0
    codebook = 0
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        if type(p).__name__ == "Params4bit":
            stats, codes = _quant_stat_bytes(p.quant_state)
            n = int(torch.Size(p.quant_state.shape).numel())
            quant_params += n
            quant_bytes += _nbytes(p) + stats
            codebook = max(codebook, codes)
            frozen += _nbytes(p) + stats
        elif p.requires_grad:
            trainable += _nbytes(p)
            trainable_numel += p.numel()
        else:
            frozen += _nbytes(p)
    frozen += codebook
    buffers = sum(_nbytes(b) for b in model.buffers())
    grads = trainable
    opt_state = 0
    if optimizer is not None:
        opt_state = sum(_nbytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    if not opt_state:
        opt_state = 2 * 4 * trainable_numel
    report = {
        "frozen_bytes": frozen, "trainable_bytes": trainable, "grad_bytes": grads, "optimizer_bytes": opt_state,
        "buffer_bytes": buffers, "total_bytes": frozen + trainable + grads + opt_state + buffers,
        "trainable_params": trainable_numel, "quantized_params": quant_params,
        "bits_per_quantized_param": 8 * (quant_bytes + codebook) / quant_params if quant_params else None,
    }
    return report


def format_memory_report(report: dict) -> str:
    """Returns the memory report as a small aligned table in MiB (what the CLI prints)."""
    mib = 2 ** 20
    rows = [("frozen weights", "frozen_bytes"), ("trainable weights", "trainable_bytes"), ("gradients", "grad_bytes"),
            ("optimizer state", "optimizer_bytes"), ("buffers", "buffer_bytes"), ("total (no activations)", "total_bytes")]
    lines = [f"{label:<24} {report[key] / mib:>10.1f} MiB" for label, key in rows]
    bits = report.get("bits_per_quantized_param")
    if bits is not None:
        lines.append(f"{'4-bit base':<24} {report['quantized_params']:>10,} params at {bits:.3f} bits/param")
    lines.append(f"{'trainable params':<24} {report['trainable_params']:>10,}")
    return "\n".join(lines)
