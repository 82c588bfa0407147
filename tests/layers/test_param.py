"""LoraParam (LoRA on a module parameter, PEFT's ParamWrapper layout) against the dense per-expert equation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.layers import LoraParam
from lorakit.layers.registry import KINDS


class Experts(nn.Module):
    """A toy experts module: y = x · W_e^T for the expert e of each row (or x · W_e when transposed)."""

    def __init__(self, E=3, d_in=8, d_out=6, transposed=False):
        super().__init__()
        self.num_experts, self.is_transposed = E, transposed
        shape = (E, d_in, d_out) if transposed else (E, d_out, d_in)
        self.w = nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, expert):
        w = self.w[expert]
        return torch.einsum("ni,nio->no", x, w) if self.is_transposed else torch.einsum("ni,noi->no", x, w)


@pytest.mark.parametrize("transposed", [False, True])
def test_delta_and_forward_follow_the_per_expert_equation(transposed):
    layer = LoraParam(Experts(transposed=transposed), "w")
    layer.add_adapter("a", r=2, alpha=4, init="none")
    layer.set_active(["a"])
    A, B = layer.factors("a")
    assert A.shape == (2 * 3, 8) and B.shape == (6, 2 * 3)  # PEFT: (r·E, in), (out, r·E)
    A_e = A.view(3, 2, 8)
    B_e = B.view(6, 2, 3).permute(2, 0, 1)  # column j·E + e of B is column j of B_e
    dense = 2.0 * B_e @ A_e  # (E, out, in)
    delta = layer.delta_weight("a")
    torch.testing.assert_close(delta, dense.transpose(1, 2) if transposed else dense)
    x, e = torch.randn(5, 8), torch.tensor([0, 2, 1, 2, 0])
    want = torch.einsum("ni,noi->no", x, (layer.owner.w.transpose(1, 2) if transposed else layer.owner.w)[e] + dense[e])
    torch.testing.assert_close(layer(x, e), want, rtol=1e-5, atol=1e-5)
    assert isinstance(layer.owner.w, nn.Parameter)  # the swap is undone after the call


def test_merge_adds_the_delta_and_unmerge_restores():
    layer = LoraParam(Experts(), "w")
    w0 = layer.owner.w.detach().clone()
    layer.add_adapter("a", r=2, alpha=2, init="none")
    layer.set_active(["a"])
    layer.merge()
    torch.testing.assert_close(layer.owner.w.detach(), w0 + layer.delta_weight("a"))
    layer.unmerge()
    torch.testing.assert_close(layer.owner.w.detach(), w0)


def test_the_registry_declares_the_peft_shapes():
    kind = next(k for k in KINDS if k.name == "param")
    layer = LoraParam(Experts(), "w")
    assert kind.shapes(layer, 4) == {".lora_A.weight": (12, 8), ".lora_B.weight": (6, 12)}
    assert not kind.wraps(Experts())  # chosen by target_parameters, never by a module's type
