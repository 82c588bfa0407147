"""NF4 weights, one at a time: QLoRA's frozen base via bitsandbytes `Linear4bit`.

    W0 (fp32, d×k)  --quantize-->  4-bit codes (d·k/2 bytes)  +  absmax per 64 weights (uint8, double-quant)
                                   +  absmax of those per 256 blocks (fp32)
    forward:  h = dequant(W0)·x + s·B·(A·x)        only A and B train (fp32)

`is_4bit` says whether a parameter or layer holds NF4 codes; `dequantize_weight` / `requantize_weight` are what
LoraLinear calls to merge into a 4-bit base; `Dequantized` is the 4-bit weight as the fused LoRA functions read
it, dequantized into one reused per-thread workspace (with bitsandbytes' CPU kernel looked up once per kind).
Whole-model quantization lives in lorakit.model.quantize.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.ops.gptq import gptq_codes, pack_4bit

QUANT_TYPES = ("nf4", "fp4")


class QuantizationBackendError(LorakitError):
    """4-bit quantization was requested but no backend can run it (package missing or device unsupported)."""


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


def is_4bit(obj) -> bool:
    """Returns True when `obj` is a bitsandbytes 4-bit parameter (Params4bit) or a layer whose weight is one."""
    p = obj if isinstance(obj, torch.Tensor) else getattr(obj, "weight", None)
    return type(p).__name__ == "Params4bit"  # by name: bitsandbytes is optional and imported only when used


def is_quantized_layer(module: nn.Module) -> bool:
    """Returns True when `module` is a bitsandbytes 4-bit linear layer (Linear4bit or a subclass)."""
    return is_4bit(module)


def numel_4bit_aware(p: torch.Tensor) -> int:
    """Returns the number of parameters `p` represents (bitsandbytes packs two 4-bit values per byte)."""
    return p.numel() * 2 if is_4bit(p) else p.numel()


def quantize_linear(linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None, block_size: int = 64,
                    hessian: torch.Tensor | None = None, damp: float = 0.01) -> nn.Module:
    """Returns a bitsandbytes Linear4bit holding `linear`'s weight quantized (on the same device) and its bias.

    Without `hessian`: round to nearest (bitsandbytes' quantize_4bit, as QLoRA). With `hessian` (XᵀX of the
    layer's calibration inputs): the codes are chosen by GPTQ (lorakit.ops.gptq) to keep X·Wᵀ; same format.
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
    backward. The fused path (`lorakit.ops.lora.lora_linear`) calls `dense()` right before the one GEMM that
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
        return dequantize_into(self.weight.data, state, out)


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


def dequantize_into(data: torch.Tensor, state, out: torch.Tensor) -> torch.Tensor:
    """Returns `out` holding dequant(data); falls back to bitsandbytes' allocating call where it cannot write there."""
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


def roundtrip(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """Returns what quantize→dequantize does to `w` with the 4-bit layer's settings (the layer is untouched)."""
    bnb = require_backend(layer.weight.device)
    qs = layer.weight.quant_state
    q, state = bnb.functional.quantize_4bit(w.to(qs.dtype).contiguous(), blocksize=qs.blocksize,
                                            compress_statistics=qs.nested, quant_type=qs.quant_type)
    return bnb.functional.dequantize_4bit(q, state).float()


def _nbytes(t: torch.Tensor | None) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def quant_stat_bytes(state) -> tuple[int, int]:
    """Returns (per-block statistics bytes, codebook bytes) of one bitsandbytes QuantState."""
    stats = _nbytes(state.absmax) + _nbytes(getattr(state, "offset", None))
    codes = _nbytes(state.code)
    inner = getattr(state, "state2", None) if state.nested else None
    if inner is not None:
        stats += _nbytes(inner.absmax)
        codes += _nbytes(inner.code)
    return stats, codes


def release_freed_memory() -> bool:
    """Returns True after asking glibc to hand freed heap memory back to the OS (the full-precision weights that
    quantization replaced would otherwise stay in the process's resident memory); False off glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
