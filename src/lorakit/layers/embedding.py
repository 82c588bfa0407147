"""LoRA on nn.Embedding: A is gathered by token id, as in loralib and PEFT.

    h[t] = W0[t] + s·(A[:, t]ᵀ·Bᵀ)        A: r×V (zero at start), B: d×r (normal)

For embeddings the roles flip at init (A zero, B random) so the gathered rows start at zero yet gradients
reach A; PEFT and loralib do the same, which keeps saved adapters interchangeable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers.base import LoraLayer


class LoraEmbedding(LoraLayer):
    """LoRA around an nn.Embedding."""

    kind = "embedding"

    def __init__(self, base_layer: nn.Embedding):
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def create_factors(self, name: str, r: int) -> None:
        V, d = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(r, V))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(d, r))

    def factors(self, name):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def init_pair(self, name):
        A, B = self.factors(name)
        return B, A  # the roles flip: gathered rows of A start at zero, B is drawn

    def draw_(self, t, name, gaussian=False):
        nn.init.normal_(t)  # as nn.Embedding draws its weight (PEFT and loralib do the same)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        return (self.scaling[name] * (B.detach().float() @ A.detach().float())).t()

    def _embed(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        return F.embedding(x, table, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        A, B = self.factors(name)
        return (self._embed(x, A.t()) @ B.t()) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        live = self.live
        result = self.base_layer(x, *args, **kwargs)
        if not live:
            return result
        if self.row_adapters is not None:
            rows = self.row_adapters
            for name in dict.fromkeys(rows):
                if name in live:
                    mask = torch.tensor([n == name for n in rows], device=x.device)
                    upd = self._update(x, name).to(result.dtype)
                    result = result + upd * mask.view(-1, *([1] * (upd.dim() - 1)))
            return result
        for name in live:
            result = result + self._update(x, name).to(result.dtype)
        return result
