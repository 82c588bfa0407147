"""The variant interface: DoRA is registered, applies only where it says, and merges back exactly."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers import LoraEmbedding, LoraLinear, LoraMergedLinear
from lorakit.variants.base import VARIANTS
from lorakit.variants.dora import DORA


def test_dora_is_registered_for_plain_linear_layers_only():
    assert VARIANTS["dora"] is DORA and DORA.layer_kinds == ("linear",)
    for layer in (LoraEmbedding(nn.Embedding(5, 4)), LoraMergedLinear(nn.Linear(4, 6), [True, False])):
        with pytest.raises(ConfigError, match="DoRA"):
            layer.add_adapter("a", 2, 2.0, use_dora=True)


def test_dora_merge_equals_forward_and_unmerge_restores_w0():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5)).double()
    w0 = layer.base_layer.weight.detach().clone()
    layer.add_adapter("a", 2, 4.0, init="none", use_dora=True)
    layer.set_active(["a"])
    assert layer.variant["a"] is DORA and layer.use_dora["a"]
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y)
        layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, w0)
