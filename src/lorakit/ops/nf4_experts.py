"""NF4 routed experts: a MoE module's 3-D expert tensors stored 4-bit, one NF4 matrix per expert.

    W (E, out, in)  --quantize-->  per expert e: NF4 codes of W_e (out·in/2 bytes) + absmax per 64 weights
                                   (uint8, double quant) + absmax of those per 256 blocks (fp32)
    forward:  the module's own forward reads `self.gate_up_proj`; for that call the name is bound to the tensor
              dequantized into one reused per-(thread, name) workspace, then unbound.

The codes live in `owner.nf4_experts[name]` (an `NF4Experts` of buffers, so .to(device) moves them) and the
name leaves `owner._parameters`; `expert_tensors(owner)` lists parameters and NF4 stores together (same
shapes). `quantize_experts(owner, name)` installs a forward on the module instance (QuantizedForward) that runs its own class
forward inside `dense_experts(owner)`, so transformers' eager, grouped_mm and batched_mm experts
implementations read the weights as before and only one dequantized copy per tensor name exists at a time.
Backward: autograd saves views of the workspace (for the input's gradient); lorakit.ops.recompute stores them
as recipes that dequantize again just the experts a view covers.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from lorakit.ops import recompute
from lorakit.ops.nf4 import dequantize_into, require_backend

STORE = "nf4_experts"  # the submodule of an experts module holding its 4-bit tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.float32) if t.dtype == torch.int32 else t


class NF4Experts(nn.Module):
    """An (E, a, b) expert tensor as E NF4 matrices (a, b) with bitsandbytes' format, stacked into buffers."""

    def __init__(self, weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True,
                 block_size: int = 64):
        super().__init__()
        self.shape = torch.Size(weight.shape)
        self.weight_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            else torch.float32
        self.quant_type, self.blocksize, self.nested = quant_type, block_size, double_quant
        # Not persistent: a model's state_dict keeps no half-supported 4-bit experts format (adapters never need it).
        for n in ("codes", "absmax", "offset", "absmax2", "code", "code2"):
            self.register_buffer(n, None, persistent=False)
        self.blocksize2 = 256
        self.requantize(weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_dtype

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def dim(self) -> int:
        return len(self.shape)

    @torch.no_grad()
    def requantize(self, weight: torch.Tensor) -> None:
        """Quantizes `weight` (E, a, b), any float dtype, into this store in place, expert by expert."""
        bnb = require_backend(self.codes.device if self.codes is not None else weight.device)
        if tuple(weight.shape) != tuple(self.shape):
            raise ValueError(f"NF4Experts: weight of shape {tuple(weight.shape)} for a store of {tuple(self.shape)}")
        device = self.codes.device if self.codes is not None else weight.device
        codes, absmax, offset, absmax2 = [], [], [], []
        for e in range(self.shape[0]):
            w = weight[e].detach().to(device=device, dtype=self.weight_dtype).contiguous()
            q, st = bnb.functional.quantize_4bit(w, blocksize=self.blocksize, compress_statistics=self.nested,
                                                 quant_type=self.quant_type)
            codes.append(q.reshape(-1))
            absmax.append(st.absmax)
            if self.nested:
                offset.append(st.offset.reshape(()))
                absmax2.append(st.state2.absmax)
        # fp32 statistics are kept bit-cast to int32: model.to(dtype) / .half() cast only floating buffers, and
        # these must stay exact (as bitsandbytes' QuantState, which is no buffer, does for Linear4bit).
        self.codes, self.absmax, self.code = torch.stack(codes), _bits(torch.stack(absmax)), _bits(st.code.float())
        if self.nested:
            self.offset, self.absmax2 = _bits(torch.stack(offset).float()), _bits(torch.stack(absmax2).float())
            self.code2, self.blocksize2 = _bits(st.state2.code.float()), st.state2.blocksize

    def _apply(self, fn, recurse=True):
        # The dequantized dtype follows a model-wide dtype cast as a parameter's would (the codes cannot).
        probe = fn(torch.empty(0, dtype=self.weight_dtype, device=self.codes.device))
        if probe.dtype in (torch.float32, torch.float16, torch.bfloat16):
            self.weight_dtype = probe.dtype
        return super()._apply(fn, recurse)

    def quant_state(self, e: int):
        """Returns bitsandbytes' QuantState of expert e (views of the stacked buffers)."""
        from bitsandbytes.functional import QuantState
        state2 = None
        if self.nested:
            state2 = QuantState(absmax=_float(self.absmax2[e]), code=_float(self.code2), blocksize=self.blocksize2,
                                dtype=torch.float32)
        return QuantState(absmax=_float(self.absmax[e]), shape=self.shape[1:], code=_float(self.code),
                          blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.weight_dtype,
                          offset=_float(self.offset[e]) if self.nested else None, state2=state2)

    @torch.no_grad()
    def dequantize(self, out: torch.Tensor | None = None, first: int = 0, last: int | None = None) -> torch.Tensor:
        """Returns experts first..last-1 dequantized, (last-first, a, b), written into `out` when given."""
        last = self.shape[0] if last is None else last
        if out is None:
            out = torch.empty((last - first, *self.shape[1:]), dtype=self.weight_dtype, device=self.device)
        a, b = self.shape[1:]
        if (a * b) % self.blocksize or b % 2 or last - first < 2 or not self.fused_dequantize:
            for i, e in enumerate(range(first, last)):
                dequantize_into(self.codes[e], self.quant_state(e), out[i])
            return out
        # No block straddles two experts: the range is one NF4 matrix (k·a, b) with fp32 block scales, one kernel
        # call instead of one per expert (128 experts x 2 tensors x every layer add up).
        from bitsandbytes.functional import QuantState
        state = QuantState(absmax=self._block_scales(first, last), shape=torch.Size(((last - first) * a, b)),
                           code=_float(self.code), blocksize=self.blocksize, quant_type=self.quant_type,
                           dtype=self.weight_dtype)
        dequantize_into(self.codes[first:last].reshape(-1), state, out.view(-1, b))
        return out

    fused_dequantize = True  # class default; False dequantizes expert by expert (the reference in tests)

    def _block_scales(self, first: int, last: int) -> torch.Tensor:
        # The per-64 absmax of experts first..last-1 as fp32, flat: double quantization's 8-bit codes times their
        # per-256 scale plus the expert's offset (what bitsandbytes' dequantize_blockwise computes per expert).
        absmax = self.absmax[first:last]
        if not self.nested:
            return _float(absmax).reshape(-1)
        nb = absmax.shape[1]
        scale = _float(self.absmax2[first:last]).repeat_interleave(self.blocksize2, dim=1)[:, :nb]
        return (_float(self.code2)[absmax.long()] * scale + _float(self.offset[first:last]).unsqueeze(1)).reshape(-1)

    def roundtrip(self, weight: torch.Tensor) -> torch.Tensor:
        """Returns what quantize→dequantize with this store's settings does to `weight` (the store is untouched)."""
        w = weight.to(self.device)
        return NF4Experts(w, self.quant_type, self.nested, self.blocksize).to(dtype=self.weight_dtype).dequantize()

    def rebuild(self, shape, stride, offset) -> torch.Tensor:
        """Returns a saved view of the dequantized tensor, dequantizing only the experts it covers (backward)."""
        per = self.shape[1] * self.shape[2]
        end = offset + sum((s - 1) * st for s, st in zip(shape, stride)) if all(shape) else offset
        first, last = offset // per, min(end // per + 1, self.shape[0])
        return self.dequantize(first=first, last=last).as_strided(shape, stride, offset - first * per)

    def nbytes(self) -> int:
        """Returns the bytes of the codes and per-block statistics (the codebooks are a fixed few hundred)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.absmax, self.offset, self.absmax2)
                   if t is not None)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, {self.quant_type}, double_quant={self.nested}, blocksize={self.blocksize}"


def quantized_experts(owner: nn.Module) -> dict[str, NF4Experts]:
    """Returns {tensor name: NF4Experts} of `owner`'s 4-bit expert tensors (empty for anything else)."""
    store = owner._modules.get(STORE)
    return dict(store.items()) if store is not None else {}


def quantized_numel(model: nn.Module) -> int:
    """Returns the number of weights `model`'s 4-bit expert stores represent (they are buffers, not parameters)."""
    return sum(int(s.shape.numel()) for m in model.modules() for s in quantized_experts(m).values())


def expert_tensors(owner: nn.Module) -> dict:
    """Returns `owner`'s parameters and 4-bit expert stores by name, in registration order (stores answer
    .shape, .dim(), .dtype and .device like the parameters they replaced)."""
    out = {k: p for k, p in owner._parameters.items() if p is not None}
    out.update(quantized_experts(owner))
    order = owner.__dict__.get("_nf4_order")  # registration order before quantization (inject nests by it)
    return {k: out[k] for k in order if k in out} | out if order else out


class QuantizedForward:
    """An experts module's forward while its tensors are 4-bit: the class forward with the weights bound.

    An object, not a bound function, so that deepcopy and pickle of the model keep it (bound to the copy)."""

    def __init__(self, owner: nn.Module):
        self.owner = owner

    def __call__(self, *args, **kwargs):
        with dense_experts(self.owner):
            return type(self.owner).forward(self.owner, *args, **kwargs)


def quantize_experts(owner: nn.Module, name: str, quant_type: str = "nf4", double_quant: bool = True,
                     block_size: int = 64) -> NF4Experts:
    """Replaces `owner`'s 3-D parameter `name` by its NF4 store and makes the module's forward read it."""
    require_backend(owner._parameters[name].device)
    owner.__dict__.setdefault("_nf4_order", list(owner._parameters))
    store = NF4Experts(owner._parameters[name], quant_type, double_quant, block_size)
    if STORE not in owner._modules:
        owner.add_module(STORE, nn.ModuleDict())
    owner._modules[STORE][name] = store
    del owner._parameters[name]
    owner.__dict__["forward"] = QuantizedForward(owner)  # the instance's forward (nn.Module calls self.forward)
    return store


def dequantize_experts(owner: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Turns `owner`'s NF4 expert stores back into frozen parameters (in their dtype unless given)."""
    stores = quantized_experts(owner)
    if not stores:
        return
    for name, store in stores.items():
        owner._parameters[name] = nn.Parameter(store.dequantize().to(dtype or store.dtype), requires_grad=False)
    order = owner.__dict__.pop("_nf4_order", None) or []
    owner._parameters = {k: owner._parameters[k] for k in order if k in owner._parameters} | owner._parameters
    del owner._modules[STORE]
    owner.__dict__.pop("forward", None)


_local = threading.local()


def _workspace(name: str, store: NF4Experts) -> torch.Tensor:
    # One buffer per (thread, device, dtype, tensor name): gate_up_proj and down_proj are read in the same call.
    pool = _local.__dict__.setdefault("pool", {})
    key = (store.device, store.dtype, name)
    n = store.shape.numel()
    buf = pool.get(key)
    if buf is None or buf.numel() < n:
        buf = pool[key] = torch.empty(n, dtype=store.dtype, device=store.device)
    return buf[:n].view(store.shape)


def free_workspace() -> None:
    """Releases this thread's expert dequantization buffers."""
    _local.__dict__.pop("pool", None)


@contextlib.contextmanager
def dense_experts(owner: nn.Module):
    """Binds each 4-bit expert tensor of `owner` not already bound to its dequantized value for the block.

    With gradients on, the value is a reused workspace and views autograd saves are rebuilt from the codes in
    backward (lorakit.ops.recompute). Under another saved-tensor hook (e.g. non-reentrant checkpointing, which
    keeps or recomputes what it saves) the value is a fresh tensor, so whatever that hook keeps stays valid."""
    stores = quantized_experts(owner)
    names = [n for n in stores if n not in owner.__dict__]
    if not names:
        yield
        return
    grad = torch.is_grad_enabled()
    state = recompute.hook_state() if grad else "none"
    keys = []
    try:
        for n in names:
            if state == "foreign":
                owner.__dict__[n] = stores[n].dequantize()
                continue
            w = stores[n].dequantize(out=_workspace(n, stores[n]))
            if grad:
                keys.append(recompute.register(w, stores[n].rebuild))
            owner.__dict__[n] = w
        with recompute.hooks() if keys and state == "none" else contextlib.nullcontext():
            yield
    finally:
        for n in names:
            owner.__dict__.pop(n, None)
        for k in keys:
            recompute.release(k)
