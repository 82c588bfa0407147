"""One call for sibling LoRA projections that read the same input (q, k, v; gate, up): exact and optional.

    x ─┬─► q_proj ─►          x ─► [A_q;A_k;A_v] (one GEMM) ─┬─► W_q·x + s·B_q·(A_q·x) ─► q
       ├─► k_proj ─►   ==>                                   ├─► W_k·x + s·B_k·(A_k·x) ─► k   (all computed on
       └─► v_proj ─►                                         └─► W_v·x + s·B_v·(A_v·x) ─► v    q_proj's call)

`fuse_shared_inputs(model)` links the sibling wrappers into a `SharedInputGroup`. The model's code is not
changed: the first sibling called with x computes every sibling's output with `lora_linear_shared` and keeps
the others' outputs for their own calls with that very tensor (same object, same version, same grad mode).
Any other call (another input, dropout active, a second live adapter, DoRA, mixed batches, torch.compile
tracing) takes the ordinary per-layer path, so the math never changes, only the number of passes over x.
`unfuse(model)` removes the links. Nothing is stored in state_dict.

A group that guesses wrong (siblings called on different inputs, as in an encoder-decoder's cross-attention,
where q reads the decoder and k, v the encoder) wastes the siblings' GEMMs once; after 2 such misses it turns
itself off for good and every call takes the per-layer path.

Applied by default by `lorakit.inject`: it is exact (logits bit-identical to the unfused model in fp32, gradients
equal up to fp32 summation order; tests/model/test_shared_input.py), never slower in the bench runs (docs/RESULTS.md),
bounded when it guesses wrong, and `unfuse` turns it off (e.g. before sharding the projections of one block apart).
"""
from __future__ import annotations

import torch
from torch import nn

from lorakit.layers.linear import LoraLinear
from lorakit.ops.lora import lora_linear_shared

# sibling groups by module name, as in Llama, Mistral, Qwen2, Gemma, Phi-3's MLP
DEFAULT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class SharedInputGroup:
    """Sibling LoraLinear layers of one parent; computes all their outputs on the first call with an input."""

    def __init__(self, layers):
        self.layers = list(layers)
        self._x = None  # the input whose outputs are pending (held, so its identity cannot be reused)
        self._key = None  # (x._version, grad mode) when they were computed
        self._pending: dict[int, torch.Tensor] = {}
        self.misses = 0  # computed sibling outputs that were never asked for

    def clear(self) -> None:
        self._x, self._key, self._pending = None, None, {}

    def eligible(self) -> str | None:
        """Returns the one adapter name all siblings can fuse on right now, or None."""
        first = self.layers[0]
        live = first.live
        if len(live) != 1 or self.misses >= 2 or torch.compiler.is_compiling():
            return None
        name = live[0]
        for layer in self.layers:
            if (layer.live != live or layer.row_adapters is not None or not layer.fusable
                    or layer.variant[name] is not None or (layer.dropout_p[name] > 0 and layer.training)):
                return None
        return name

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor | None:
        """Returns layer's output for x (computing all siblings' on a miss), or None to take the plain path."""
        key = (x._version, torch.is_grad_enabled())
        i = self.layers.index(layer)
        if x is self._x and key == self._key and i in self._pending:
            out = self._pending.pop(i)
            if not self._pending:
                self.clear()
            return out
        if self._pending:  # the siblings did not read the input we computed them for
            self.misses += 1
            self.clear()
        name = self.eligible()
        if name is None:
            return None
        weights = [l.fused_weight(x, name) for l in self.layers]  # tensors or 4-bit weights dequantized on demand
        if any(w is None or w.device != x.device for w in weights):
            return None
        bases = [l.base_layer for l in self.layers]
        outs = lora_linear_shared(x, weights, [b.bias for b in bases],
                                  [l.lora_A[name].weight for l in self.layers],
                                  [l.lora_B[name].weight for l in self.layers],
                                  [l.scaling[name] for l in self.layers])
        self._x, self._key = x, key
        self._pending = {j: o for j, o in enumerate(outs) if j != i}
        return outs[i]


def fuse_shared_inputs(model: nn.Module, groups=DEFAULT_GROUPS) -> int:
    """Links sibling LoRA projections that read the same input; returns how many groups were linked."""
    n = 0
    for parent in model.modules():
        for names in groups:
            layers = [getattr(parent, nm, None) for nm in names]
            if not all(type(l) is LoraLinear for l in layers):  # not LoraMergedLinear or other subclasses
                continue
            if len({l.in_features for l in layers}) != 1:
                continue
            group = SharedInputGroup(layers)
            for l in layers:
                l.set_shared_group(group)
            n += 1
    return n


def unfuse(model: nn.Module) -> int:
    """Removes every shared-input link; returns how many layers were unlinked."""
    n = 0
    for m in model.modules():
        if isinstance(m, LoraLinear) and m.shared_group is not None:
            m.set_shared_group(None)
            n += 1
    return n
