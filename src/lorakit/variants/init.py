"""How a new adapter's factors start (PEFT's init_lora_weights): INITS maps each method name to one function.

An init function takes (layer, adapter name) and writes the factors in place. It draws through the layer's
`init_pair(name)` (the factor drawn at random, the factor that starts at zero: A and B for linear and conv,
B and A for embeddings) and `draw_(tensor, name, gaussian)` (each layer kind's random distribution), so one
function serves every layer kind. Inits that start from W0 (BASE_INITS) also rewrite the base weight so that
W0' + s·B·A equals W0 at step 0. The names must match lorakit.config.INIT_METHODS (tests/variants checks).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.ops.nf4 import is_4bit


def kaiming(layer, name: str) -> None:
    """Random factor kaiming-uniform (embeddings: normal), the other zero: the update starts at zero."""
    rnd, zero = layer.init_pair(name)
    layer.draw_(rnd, name)
    nn.init.zeros_(zero)


def gaussian(layer, name: str) -> None:
    """Random factor normal with std 1/r (embeddings: as kaiming), the other zero."""
    rnd, zero = layer.init_pair(name)
    layer.draw_(rnd, name, gaussian=True)
    nn.init.zeros_(zero)


def random_both(layer, name: str) -> None:
    """Both factors random (init_lora_weights=False): a non-zero update from the start, for tests, as in PEFT."""
    rnd, zero = layer.init_pair(name)
    layer.draw_(rnd, name)
    layer.draw_(zero, name)


def _from_base(layer, name: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    # The (d, k) fp32 base weight the principal-direction inits start from.
    if not layer.base_init:
        raise ConfigError(f"init_lora_weights={method!r} is supported on plain linear layers only, "
                          f"not {type(layer).__name__}({type(layer.base_layer).__name__})")
    if is_4bit(layer.base_weight):
        raise ConfigError(f"init_lora_weights={method!r} needs a full-precision base; quantize after init")
    return layer.dense_weight_fp32()


def _start_on(layer, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    # Put the factors in place and remove their part from W0, so W0' + s·B·A == W0 exactly as at step 0.
    pA, pB = layer.factors(name)
    pA.copy_(A)
    pB.copy_(B)
    delta = layer.scaling[name] * (pB.float() @ pA.float())
    layer.write_base_fp32(layer.read_base_fp32() - layer.to_base_layout(delta))


def pissa(layer, name: str) -> None:
    """PiSSA: the factors start on W0's top-r singular directions (split sqrt(S) between them)."""
    w = _from_base(layer, name, "pissa")
    r, s = layer.r[name], layer.scaling[name]
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    root = (S[:r] / s).sqrt()
    _start_on(layer, name, torch.diag(root) @ Vh[:r], U[:, :r] @ torch.diag(root))


def olora(layer, name: str) -> None:
    """OLoRA: the factors start on W0's QR decomposition (B = Q's first r columns, A = R's first r rows)."""
    w = _from_base(layer, name, "olora")
    r = layer.r[name]
    Q, R = torch.linalg.qr(w)
    _start_on(layer, name, R[:r], Q[:, :r])


INITS: dict[str, Callable[..., None]] = {
    "kaiming": kaiming, "gaussian": gaussian, "pissa": pissa, "olora": olora, "none": random_both,
}
BASE_INITS = frozenset({"pissa", "olora"})  # inits that change W0: loading an adapter must redo them


def init_adapter(layer, name: str, method: str) -> None:
    """Initialises adapter `name`'s factors on `layer` with INITS[method]."""
    fn = INITS.get(method)
    if fn is None:
        raise ConfigError(f"init_lora_weights: unknown init {method!r}; choose one of {', '.join(INITS)}")
    with torch.no_grad():
        fn(layer, name)
