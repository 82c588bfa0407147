"""INITS: every init method on every layer kind it supports; the registry matches LoraConfig's names."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.config import INIT_METHODS
from lorakit.errors import ConfigError
from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear, LoraMergedLinear
from lorakit.variants.init import BASE_INITS, INITS, init_adapter

LAYERS = {
    "linear": lambda: LoraLinear(nn.Linear(12, 10)),
    "merged": lambda: LoraMergedLinear(nn.Linear(12, 9), [True, False, True]),
    "embedding": lambda: LoraEmbedding(nn.Embedding(20, 8)),
    "conv": lambda: LoraConv(nn.Conv2d(3, 4, 3)),
}
INPUTS = {"linear": lambda: torch.randn(5, 12), "merged": lambda: torch.randn(5, 12),
          "embedding": lambda: torch.randint(0, 20, (2, 6)), "conv": lambda: torch.randn(2, 3, 7, 7)}


def test_inits_registry_matches_config_names():
    assert set(INITS) == set(INIT_METHODS)
    assert BASE_INITS <= set(INITS)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("init", sorted(INITS))
def test_init_keeps_the_base_output_or_refuses(kind, init):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    x = INPUTS[kind]()
    with torch.no_grad():
        before = layer.base_layer(x).clone()
    if init in BASE_INITS and not layer.base_init:
        with pytest.raises(ConfigError, match=init):
            layer.add_adapter("a", 2, 4.0, init=init)
        return
    layer.add_adapter("a", 2, 4.0, init=init)
    layer.set_active(["a"])
    with torch.no_grad():
        after = layer(x)
    if init == "none":  # both factors random: the update is not zero
        assert not torch.allclose(after, before)
    else:
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_a_new_init_is_one_function(monkeypatch):
    def ones(layer, name):
        A, B = layer.init_pair(name)
        nn.init.ones_(A)
        nn.init.ones_(B)
    monkeypatch.setitem(INITS, "ones", ones)
    layer = LoraLinear(nn.Linear(4, 3))
    layer.add_adapter("a", 2, 2.0, init="kaiming")
    init_adapter(layer, "a", "ones")
    torch.testing.assert_close(layer.delta_weight("a"), torch.full((3, 4), 2.0))


def test_unknown_init_names_the_choices():
    layer = LoraLinear(nn.Linear(4, 3))
    layer.add_adapter("a", 2, 2.0)
    with pytest.raises(ConfigError, match="kaiming"):
        init_adapter(layer, "a", "nope")
