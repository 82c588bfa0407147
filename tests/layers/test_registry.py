"""The layer-kind registry: every wrapper kind is listed, and its declared PEFT shapes are the real ones."""
from __future__ import annotations

import pytest
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer
from lorakit.layers.registry import KINDS, SUPPORTED, kind_of_base, kind_of_layer, wrap


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def test_every_wrapper_kind_is_in_the_registry():
    kinds = {k for entry in KINDS for k in entry.wrapper_kinds}
    assert {c.kind for c in _all_subclasses(LoraLayer) if c.kind} <= kinds


@pytest.mark.parametrize("base", [nn.Linear(6, 4), nn.Embedding(11, 5), nn.Conv1d(3, 4, 2), nn.Conv2d(2, 3, (3, 2))],
                         ids=["linear", "embedding", "conv1d", "conv2d"])
def test_declared_shapes_are_the_factors_shapes(base):
    layer = wrap(base, "m", LoraConfig())
    layer.add_adapter("a", 3, 3.0)
    kind = kind_of_layer(layer)
    assert kind is kind_of_base(base)
    A, B = layer.factors("a")
    assert kind.shapes(base, 3) == {kind.keys[0]: tuple(A.shape), kind.keys[1]: tuple(B.shape)}


def test_unsupported_module_names_what_is_supported():
    with pytest.raises(ConfigError, match="nn.Embedding"):
        wrap(nn.LayerNorm(4), "norm", LoraConfig())
    assert "nn.Linear" in SUPPORTED
