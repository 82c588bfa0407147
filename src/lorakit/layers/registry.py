"""One entry per base-layer kind: what it wraps, the wrapper it gets, its PEFT key names and expected shapes.

inject finds the wrapper for a target here, and io names and checks an adapter's tensors here; adding a layer
kind is one new wrapper module plus one `LayerKind` in KINDS (docs/ARCHITECTURE.md, "Extending").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layers.base import LoraLayer
from lorakit.layers.conv import LoraConv
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear, LoraMergedLinear, linear_shape


def is_linear(module: nn.Module) -> bool:
    """Returns True for nn.Linear, transformers' Conv1D and bitsandbytes 4/8-bit linear layers."""
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")


@dataclass(frozen=True)
class LayerKind:
    """A base-layer kind LoRA can wrap."""

    name: str
    describes: str  # the base layers, for messages
    wraps: Callable[[nn.Module], bool]  # does this kind wrap that base layer?
    build: Callable[[nn.Module, str, LoraConfig], LoraLayer]  # (base, module name, config) -> wrapper
    wrapper_kinds: tuple[str, ...]  # LoraLayer.kind values of its wrappers
    keys: tuple[str, str]  # PEFT key suffixes of A and B
    factor_shapes: Callable[[nn.Module, int], tuple[tuple, tuple]]  # (base, r) -> (A shape, B shape)
    variant_shapes: Callable[[nn.Module], dict[str, tuple]] = lambda base: {}  # DoRA's magnitude, ...

    def shapes(self, base: nn.Module, r: int, use_dora: bool = False) -> dict[str, tuple]:
        """Returns {PEFT key suffix: shape} of one adapter of rank r on `base`."""
        a, b = self.factor_shapes(base, r)
        shapes = {self.keys[0]: a, self.keys[1]: b}
        if use_dora:
            shapes.update(self.variant_shapes(base))
        return shapes


def _build_linear(base: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
    slices = config.slices_for(name)
    if slices is not None:
        return LoraMergedLinear(base, slices, fan_in_fan_out=None)
    fan = True if type(base).__name__ == "Conv1D" else config.fan_in_fan_out
    return LoraLinear(base, fan_in_fan_out=fan)


def _linear_shapes(base, r):
    k, d, _ = linear_shape(base)
    return (r, k), (d, r)


def _conv_shapes(base, r):
    kernel = tuple(base.weight.shape[2:])
    return (r, base.in_channels, *kernel), (base.out_channels, r) + (1,) * len(kernel)


KINDS: tuple[LayerKind, ...] = (
    LayerKind("linear", "nn.Linear, transformers Conv1D, bitsandbytes Linear4bit", is_linear, _build_linear,
              ("linear", "merged_linear"), (".lora_A.weight", ".lora_B.weight"), _linear_shapes,
              lambda base: {".lora_magnitude_vector": (linear_shape(base)[1],)}),
    LayerKind("embedding", "nn.Embedding", lambda m: isinstance(m, nn.Embedding), lambda m, n, c: LoraEmbedding(m),
              ("embedding",), (".lora_embedding_A", ".lora_embedding_B"),
              lambda base, r: ((r, base.weight.shape[0]), (base.weight.shape[1], r))),
    LayerKind("conv", "nn.Conv1d/2d/3d", lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
              lambda m, n, c: LoraConv(m), ("conv",), (".lora_A.weight", ".lora_B.weight"), _conv_shapes),
)
SUPPORTED = ", ".join(k.describes for k in KINDS)


def kind_of_base(module: nn.Module) -> LayerKind | None:
    """Returns the kind that wraps base layer `module`, or None when LoRA cannot wrap it."""
    return next((k for k in KINDS if k.wraps(module)), None)


def kind_of_layer(layer: LoraLayer) -> LayerKind:
    """Returns the kind entry of a LoRA wrapper."""
    return next(k for k in KINDS if layer.kind in k.wrapper_kinds)


def wrap(module: nn.Module, name: str, config: LoraConfig) -> LoraLayer:
    """Returns a new LoRA wrapper (no adapter yet) for base layer `module` named `name`."""
    kind = kind_of_base(module)
    if kind is None:
        raise ConfigError(f"target {name!r} is a {type(module).__name__}, which LoRA cannot wrap; supported: {SUPPORTED}")
    if kind.name != "linear" and config.slices_for(name) is not None:
        raise ConfigError(f"enable_lora: {name} is a {type(module).__name__}, fused slices need a linear layer")
    return kind.build(module, name, config)
