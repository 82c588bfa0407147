"""Many adapters on one model: select, disable, delete, switch merged, combine.

    set_adapter(model, "math")              only "math" runs (and trains)
    set_adapter(model, ["math", "style"])   both run; their updates add up
    with disable_adapters(model): ...       the base model's exact output
    switch_merged_adapter(model, "style")   W0 + ΔW_math  ->  W0 + ΔW_style in one fp32 update per layer

Mixed batches (one adapter per row) are lorakit.model.mixed_batch.
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer, LoraMergedLinear, ModulesToSave
from lorakit.model.state import (active_adapters, adapter_configs, check_adapter_name, check_known, lora_layers,
                                 mark_trainable, set_active_names, set_adapter, set_adapter_configs, wrappers)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: inside it the model gives the base model's exact output (merged adapters are unmerged)."""
    merged = {id(layer): list(layer.merged_adapters) for _, layer in lora_layers(model)}
    for _, layer in lora_layers(model):
        layer.unmerge()
    for module in wrappers(model):
        module.set_disabled(True)
    try:
        yield model
    finally:
        for module in wrappers(model):
            module.set_disabled(False)
        for _, layer in lora_layers(model):
            layer.merge(merged[id(layer)])


def delete_adapter(model: nn.Module, name: str) -> None:
    """Removes adapter `name` from every layer and from the model's configs."""
    check_known(model, [name])
    for module in wrappers(model):
        module.delete_adapter(name)
    configs = dict(adapter_configs(model))
    del configs[name]
    set_adapter_configs(model, configs)
    remaining = [a for a in active_adapters(model) if a != name]
    set_active_names(model, remaining)
    mark_trainable(model, remaining)


def switch_merged_adapter(model: nn.Module, name: str) -> None:
    """With one adapter merged into W0, replaces it by `name`: W += ΔW_name - ΔW_old (fp32) in each layer."""
    check_known(model, [name])
    olds = {a for _, layer in lora_layers(model) for a in layer.merged_adapters}
    if len(olds) != 1:
        raise ConfigError(f"switch_merged_adapter needs exactly one merged adapter, found {sorted(olds) or 'none'}")
    old = olds.pop()
    for _, layer in lora_layers(model):
        has_old, has_new = old in layer.merged_adapters, name in layer.r
        if has_old and has_new:
            layer.switch_merged(old, name)
        elif has_old:
            layer.unmerge([old])
        elif has_new:
            layer.merge([name])
        layer.set_active([name])
    for module in wrappers(model):
        if isinstance(module, ModulesToSave):
            module.set_active([name])
    set_active_names(model, (name,))


def combine_adapters(model: nn.Module, names: list[str], weights: list[float], new_name: str,
                     method: str = "cat", rank: int | None = None) -> None:
    """Adds adapter `new_name` combining `names` with `weights`; method "cat", "linear" or "svd".

    cat:    ranks concatenated; the new update is exactly Σ wᵢ·ΔWᵢ.
    linear: factors summed (needs equal ranks): A = Σ √|wᵢsᵢ|·Aᵢ, B = Σ sign(wᵢ)√|wᵢsᵢ|·Bᵢ — cheap, but the
            product has cross terms, so it is not Σ wᵢ·ΔWᵢ (as in PEFT).
    svd:    truncated SVD of Σ wᵢ·ΔWᵢ to `rank` (default: the largest input rank); the best rank-R fit.
    The new adapter has scale 1 (lora_alpha = its rank) and is not activated.
    """
    check_adapter_name(new_name)
    check_known(model, names)
    configs = adapter_configs(model)
    if new_name in configs:
        raise ConfigError(f"adapter {new_name!r} already exists")
    if len(weights) != len(names) or not names:
        raise ConfigError(f"combine_adapters: {len(names)} adapters but {len(weights)} weights")
    if method not in ("cat", "linear", "svd"):
        raise ConfigError(f"combine_adapters: unknown method {method!r}; choose cat, linear or svd")
    planned = []
    for lname, layer in lora_layers(model):
        present = [(n, w) for n, w in zip(names, weights) if n in layer.r]
        if not present:
            continue
        if isinstance(layer, LoraMergedLinear):
            raise ConfigError(f"combine_adapters: {lname} has fused slices (enable_lora); combine is not supported")
        if any(layer.use_dora[n] for n, _ in present):
            raise ConfigError(f"combine_adapters: {lname} uses DoRA; DoRA adapters cannot be combined")
        planned.append((lname, layer, _combined_factors(layer, present, method, rank, lname)))
    for lname, layer, (A, B) in planned:
        r = A.shape[0]
        layer.add_adapter(new_name, r, float(r), init="kaiming")
        pA, pB = layer.factors(new_name)
        with torch.no_grad():
            pA.copy_(A.to(pA.dtype))
            pB.copy_(B.to(pB.dtype))
        layer.set_active(active_adapters(model))
    base = configs[names[0]]
    ranks = {lname: A.shape[0] for lname, _, (A, _) in planned}
    r = max(ranks.values())
    new = copy.deepcopy(base)
    new.r, new.lora_alpha, new.use_rslora, new.use_dora = r, float(r), False, False
    new.rank_pattern = {f"^{lname}$".replace(".", r"\."): v for lname, v in ranks.items() if v != r}
    new.alpha_pattern = {k: float(v) for k, v in new.rank_pattern.items()}
    new.enable_lora, new.modules_to_save = None, None
    # exactly the modules that hold the combination (the inputs may have targeted different ones)
    new.target_modules = sorted(ranks)
    new.exclude_modules, new.layers_to_transform, new.layers_pattern = None, None, None
    set_adapter_configs(model, {**configs, new_name: new})
    mark_trainable(model, list(active_adapters(model)))


def _combined_factors(layer: LoraLayer, present, method: str, rank: int | None, lname: str):
    factors = [(layer.factors(n), layer.scaling[n], w) for n, w in present]
    if method == "cat":
        A = torch.cat([a.detach().float() * (w * s) for (a, _), s, w in factors], dim=0)
        B = torch.cat([b.detach().float() for (_, b), _, _ in factors], dim=1)
        return A, B
    if method == "linear":
        ranks = {a.shape[0] for (a, _), _, _ in factors}
        if len(ranks) != 1:
            raise ConfigError(f"combine_adapters(method='linear'): {lname} has ranks {sorted(ranks)}; "
                              f"linear needs equal ranks (use 'cat' or 'svd')")
        A = sum(a.detach().float() * math.sqrt(abs(w * s)) for (a, _), s, w in factors)
        B = sum(b.detach().float() * math.copysign(math.sqrt(abs(w * s)), w) for (_, b), s, w in factors)
        return A, B
    # svd: weighted sum of the dense updates, in (out, in·kernel) layout, truncated.
    out_dim = factors[0][0][1].shape[0]
    dense = sum(w * s * (b.detach().float().reshape(out_dim, -1) @ a.detach().float().reshape(a.shape[0], -1))
                for (a, b), s, w in factors)
    R = rank or max(a.shape[0] for (a, _), _, _ in factors)
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    R = min(R, S.numel())
    root = S[:R].sqrt()
    A = (root[:, None] * Vh[:R])
    B = U[:, :R] * root[None, :]
    a0, b0 = factors[0][0]
    A = A.reshape(R, *a0.shape[1:])
    B = B.reshape(out_dim, R, *b0.shape[2:])
    return A, B
