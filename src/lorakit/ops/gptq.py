"""NF4 with GPTQ rounding: the same 4-bit format as QLoRA's, with the codes chosen to keep each layer's output.

    calibration inputs ──► X per linear layer ──► H = XᵀX ──► GPTQ over the columns of W, in NF4 blocks of 64:
        for each column j:  q_j = absmax·NF4(w_j / absmax)      (absmax: the block's, as bitsandbytes stores it)
                            e_j = (w_j − q_j) / [H⁻¹]_jj        (Cholesky factor of H⁻¹)
                            w_{>j} −= e_j · [H⁻¹]_{j,>j}          (later columns absorb the rounding error)
    codes + absmax ──► bitsandbytes' layout (2 codes per byte, double-quantized absmax) ──► Linear4bit

Round-to-nearest NF4 (`lorakit.quantize`, as in the QLoRA paper) minimises the weight error ‖W − Q‖; GPTQ
(Frantar et al., 2022) minimises the output error ‖XWᵀ − XQᵀ‖ on calibration inputs, which is what the model
feels. The stored layer is an ordinary bitsandbytes Linear4bit (4.127 bits per weight with double
quantization): training, the fused LoRA path, saving adapters and merging are unchanged.

Why it matters: small models are fragile under 4 bits (bench/qlora_quality.py measures how much GPTQ recovers).

Layers are processed in module order, a group at a time (the Hessians of a group fit in `hessian_budget`
bytes): one pass over the calibration data per group, so later groups see the already-quantized earlier
layers' outputs, as GPTQ's sequential variant does.
"""
from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import ConfigError


def nf4_levels(quant_type: str = "nf4", device="cpu") -> torch.Tensor:
    """Returns the 16 values a 4-bit code stands for (bitsandbytes' table), ascending."""
    from bitsandbytes.functional import get_4bit_type
    return get_4bit_type(quant_type, device=device).float()


def nearest_code(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Returns the index of the nearest level for each element of x (levels ascending); ties go to the lower."""
    mid = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, mid, right=False)


def pack_4bit(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype, blocksize: int = 64,
              double_quant: bool = True, quant_type: str = "nf4"):
    """Returns (packed uint8 (n/2, 1), QuantState) in bitsandbytes' layout for codes (out, in) and absmax per block.

    The layout is bitsandbytes' own: two codes per byte (the first in the high nibble), absmax per block of
    `blocksize` consecutive weights, double-quantized as bitsandbytes does it (mean offset, 8-bit blockwise).
    """
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    packed = ((flat[0::2] << 4) | flat[1::2]).reshape(-1, 1)
    code = get_4bit_type(quant_type, device=codes.device)
    absmax = absmax.float().reshape(-1)
    if double_quant:
        offset = absmax.mean()
        qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
        state = QuantState(absmax=qabsmax, shape=codes.shape, dtype=dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=absmax, shape=codes.shape, dtype=dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type)
    return packed, state


@torch.no_grad()
def gptq_codes(weight: torch.Tensor, hessian: torch.Tensor, blocksize: int = 64, damp: float = 0.01,
               quant_type: str = "nf4", lazy_batch: int = 128, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (codes (out, in) uint8, absmax (out·in/blocksize,)) for W ≈ absmax·level[codes], GPTQ-rounded.

    `hessian` is XᵀX (in, in) over calibration rows x. Blocks are `blocksize` consecutive weights of a row,
    so in_features must be a multiple of blocksize. `damp` adds damp·mean(diag H) to the diagonal.
    act_order: columns are rounded in order of decreasing input energy (diag H), so the most important ones
    go first while many columns remain to absorb their error; each block's absmax is then fixed up front from
    the original weights ("static groups"), and an updated weight beyond it rounds to the extreme level.
    Without act_order, columns go left to right and a block's absmax is taken from its updated weights.
    """
    out_f, in_f = weight.shape
    if in_f % blocksize:
        raise ConfigError(f"GPTQ rounding needs in_features ({in_f}) divisible by the block size ({blocksize})")
    lazy_batch = max(blocksize, lazy_batch // blocksize * blocksize)
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    levels = nf4_levels(quant_type, W.device)
    dead = torch.diag(H) == 0  # inputs that never fired: their weights cannot matter, keep them as rounded
    H[dead, dead] = 1
    absmax = W.abs().reshape(out_f, in_f // blocksize, blocksize).amax(dim=2)  # static groups (act_order)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    safe = lambda s: torch.where(s > 0, s, torch.ones_like(s))  # noqa: E731  (an all-zero block: any code is 0·level)
    scale = None
    for i1 in range(0, in_f, lazy_batch):
        i2 = min(i1 + lazy_batch, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if act_order:
                scale = safe(absmax[:, col // blocksize])
            elif col % blocksize == 0:  # a new block, left to right: its absmax from the weights as updated so far
                absmax[:, col // blocksize] = W1[:, i:i + blocksize].abs().amax(dim=1)
                scale = safe(absmax[:, col // blocksize])
            w = W1[:, i]
            c = nearest_code(w / scale, levels)
            codes[:, col] = c.to(torch.uint8)
            err = (w - levels[c] * scale) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, absmax.reshape(-1)


class HessianCollector:
    """Accumulates XᵀX (fp32) of each watched module's input over forward calls (forward pre-hooks)."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.h: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            if name not in self.h:
                self.h[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
            self.h[name].addmm_(x.t(), x)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def hessian_bytes(linear: nn.Module) -> int:
    """Returns the bytes of one layer's fp32 XᵀX (in_features²)."""
    return 4 * linear.in_features ** 2


@torch.no_grad()
def run_calibration(model: nn.Module, calibration) -> None:
    """Runs the model on each calibration item: a token-id tensor, or a dict of model inputs."""
    for item in calibration:
        if isinstance(item, dict):
            model(**{k: v for k, v in item.items() if k != "labels"})
        else:
            ids = torch.as_tensor(item)
            model(ids[None] if ids.dim() == 1 else ids)
