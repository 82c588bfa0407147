"""Adaptive rank during training (AdaLoRA, Zhang et al. 2023): start at rank r0, end at an average target rank.

Each adapted linear layer's update is an SVD-like triplet product whose middle factor can be pruned:

    delta_W = s · P · diag(λ) · Q          P: d×r0 (lora_B), λ: r0 (lora_A.E), Q: r0×k (lora_A.Q)
              └ B ┘   └──── A ────┘        so the unchanged LoRA hot path sees A = diag(λ)·Q, B = P

    loss  += orth_reg · mean over layers (||PᵀP − I||² + ||QQᵀ − I||²)      keeps P, Q near-orthonormal, so
                                                                          λ_i measures direction i's size
    I(w)   = |w · ∂L/∂w|                                 sensitivity of each entry of P, λ, Q
    Ī ← β1·Ī + (1−β1)·I     Ū ← β2·Ū + (1−β2)·|I − Ī|    smoothed sensitivity and its uncertainty
    score_i = Ī·Ū(λ_i) + mean_k Ī·Ū(Q_ik) + mean_d Ī·Ū(P_di)

    budget(t) = r_target·n                              for t >= total − final (mask frozen from then on)
              = r0·n                                    for t <= warmup
              = r_target·n + (r0·n − r_target·n)·(1 − (t − warmup)/(total − final − warmup))³   in between

Every `interval` steps the triplets outside the global top-`budget` (over ALL layers, so ranks move to where
they matter) get λ = 0. As in AdaLoRA a zeroed λ still receives gradient, so a pruned direction can come
back until the final phase freezes the mask.

Where the parametrization lives: `enable_adaptive_rank` swaps each layer's `lora_A[name]` (an nn.Linear)
for a `TripletFactor` whose `weight` property is diag(λ)·Q. `LoraLinear` and its fused hot path are
untouched: `factors()` still returns (lora_A.weight, lora_B.weight). `finalize` swaps plain nn.Linear
factors back in, cut to the kept triplets, and writes the per-module ranks as PEFT `rank_pattern` (with
`alpha_pattern` keeping each module's scale s), so `lorakit.save_adapter` writes a standard LoRA adapter.
A module left with no triplet is dropped (adapter deleted, name added to `exclude_modules`): PEFT needs
r >= 1, and a rank-1 zero update would be dead weight that also breaks the "sum of ranks == budget" promise.

Loop contract: loss = task_loss + controller.penalty(); loss.backward(); optimizer.step();
controller.step(global_step) (grads must still be there, i.e. before optimizer.zero_grad());
global_step counts optimizer steps from 0. After the last step: controller.finalize(); save_adapter(...).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.config import alpha_for_scale, lora_scale
from lorakit.layers import LoraLinear, LoraMergedLinear
from lorakit.model.state import adapter_configs, lora_layers, set_adapter_configs


class TripletFactor(nn.Module):
    """The A factor of an adaptive layer: parameters Q (r0×k) and E = λ (r0); `weight` is diag(λ)·Q."""

    def __init__(self, Q: torch.Tensor, E: torch.Tensor):
        super().__init__()
        self.Q = nn.Parameter(Q)
        self.E = nn.Parameter(E)

    @property
    def weight(self) -> torch.Tensor:
        """Returns diag(λ)·Q, the r0×k A factor the LoRA hot path multiplies with."""
        return self.E[:, None] * self.Q

    def extra_repr(self) -> str:
        return f"r0={self.Q.shape[0]}, in_features={self.Q.shape[1]}"


# ---------------------------------------------------------------------------- pure pieces (tested alone)
def budget_schedule(step: int, init_budget: int, target_budget: int, total_steps: int, warmup: int,
                    final: int) -> tuple[int, bool]:
    """Returns (budget, final_phase) at optimizer step `step` (from 0): cubic decay from init to target."""
    if step >= total_steps - final:
        return target_budget, True
    if step <= warmup:
        return init_budget, False
    span = max(total_steps - final - warmup, 1)
    left = 1.0 - (step - warmup) / span
    return int(target_budget + (init_budget - target_budget) * left ** 3), False


def budget_mask(scores: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """Returns {module: bool mask} keeping exactly the `budget` highest triplet scores over all modules."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().float().reshape(-1) for n in names])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    budget = max(0, min(int(budget), flat.numel()))
    if budget:
        keep[torch.topk(flat, budget).indices] = True
    out, at = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[at:at + size].clone()
        at += size
    return out


def orthogonality(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Returns ||PᵀP − I||²_F + ||QQᵀ − I||²_F for P: d×r and Q: r×k (differentiable)."""
    eye = torch.eye(P.shape[1], device=P.device, dtype=P.dtype)
    return ((P.t() @ P - eye) ** 2).sum() + ((Q @ Q.t() - eye.to(Q.dtype)) ** 2).sum()


# ---------------------------------------------------------------------------- the controller
class AdaptiveRank:
    """Owns the importance statistics and the rank budget of one adapter; see the module docstring."""

    def __init__(self, layers: dict[str, LoraLinear], adapter_name: str, target_r: int, total_steps: int,
                 warmup: int, final: int, beta1: float, beta2: float, orth_reg: float, interval: int = 1):
        self.layers = layers
        self.adapter_name = adapter_name
        self.target_r = target_r
        self.total_steps, self.warmup, self.final = total_steps, warmup, final
        self.beta1, self.beta2, self.orth_reg, self.interval = beta1, beta2, orth_reg, interval
        self.init_budget = sum(self._factors(n)[0].Q.shape[0] for n in layers)
        self.target_budget = target_r * len(layers)
        self.budget = self.init_budget
        self.frozen = False
        self.last_scores: dict[str, torch.Tensor] = {}  # the scores the current mask was chosen by
        # per module and factor ("Q", "E", "P"): smoothed sensitivity and uncertainty
        self.ipt: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layers}
        self.unc: dict[str, dict[str, torch.Tensor]] = {n: {} for n in layers}
        self.mask: dict[str, torch.Tensor] = {n: torch.ones(self._factors(n)[0].Q.shape[0], dtype=torch.bool)
                                              for n in layers}

    def _factors(self, module: str) -> tuple[TripletFactor, nn.Parameter]:
        layer = self.layers[module]
        return layer.lora_A[self.adapter_name], layer.lora_B[self.adapter_name].weight

    # ---------------------------------------------------------------- loss term
    def penalty(self, model: nn.Module | None = None) -> torch.Tensor:
        """Returns orth_reg × the mean over layers of ||PᵀP − I||² + ||QQᵀ − I||² (add it to the loss)."""
        terms = [orthogonality(P, A.Q) for A, P in map(self._factors, self.layers)]
        return self.orth_reg * torch.stack([t.float() for t in terms]).mean()

    # ---------------------------------------------------------------- importance
    @torch.no_grad()
    def update_importance(self) -> None:
        """Folds the current gradients into the smoothed sensitivity / uncertainty; returns None."""
        for n in self.layers:
            A, P = self._factors(n)
            for key, p in (("Q", A.Q), ("E", A.E), ("P", P)):
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs().float()
                if key not in self.ipt[n]:
                    self.ipt[n][key] = torch.zeros_like(ipt)
                    self.unc[n][key] = torch.zeros_like(ipt)
                avg = self.ipt[n][key].mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
                self.unc[n][key].mul_(self.beta2).add_((ipt - avg).abs(), alpha=1 - self.beta2)

    def scores(self) -> dict[str, torch.Tensor]:
        """Returns {module: (r0,) triplet scores}: s(λ_i) + mean_k s(Q_ik) + mean_d s(P_di), s = Ī·Ū."""
        out = {}
        for n in self.layers:
            r0 = self.mask[n].numel()
            s = {k: self.ipt[n][k] * self.unc[n][k] for k in self.ipt[n]}
            total = torch.zeros(r0, device=next(iter(s.values())).device if s else "cpu")
            if "E" in s:
                total = total + s["E"]
            if "Q" in s:
                total = total + s["Q"].mean(1)
            if "P" in s:
                total = total + s["P"].mean(0)
            out[n] = total.cpu()
        return out

    # ---------------------------------------------------------------- masking
    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zeroes λ of every triplet outside the current mask; returns None."""
        for n in self.layers:
            E = self._factors(n)[0].E
            E.masked_fill_(~self.mask[n].to(E.device), 0.0)

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Returns the new masks after keeping the `budget` best triplets by score and zeroing the others' λ."""
        self.budget = int(budget)
        self.last_scores = self.scores()
        self.mask = budget_mask(self.last_scores, self.budget)
        self.apply_mask()
        return self.mask

    def step(self, model: nn.Module | None = None, global_step: int = 0) -> int:
        """Updates importance and masks for optimizer step `global_step` (from 0); returns the current budget."""
        budget, final = budget_schedule(global_step, self.init_budget, self.target_budget, self.total_steps,
                                        self.warmup, self.final)
        if self.frozen:
            self.apply_mask()  # the optimizer step may have moved a pruned λ: keep it at zero
            return self.budget
        self.update_importance()
        if final:
            self.mask_to_budget(budget)
            self.frozen = True
        elif global_step > self.warmup and global_step % self.interval == 0:
            self.mask_to_budget(budget)
        return self.budget

    def ranks(self) -> dict[str, int]:
        """Returns {module: number of kept triplets} under the current mask."""
        return {n: int(m.sum()) for n, m in self.mask.items()}

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Returns the controller's statistics and masks (the factors live in the model's state_dict)."""
        return {"ipt": self.ipt, "unc": self.unc, "mask": self.mask, "budget": self.budget, "frozen": self.frozen}

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict returned; returns None."""
        self.ipt, self.unc, self.mask = state["ipt"], state["unc"], state["mask"]
        self.budget, self.frozen = int(state["budget"]), bool(state["frozen"])

    # ---------------------------------------------------------------- back to plain LoRA
    @torch.no_grad()
    def finalize(self, model: nn.Module, adapter_name: str | None = None) -> dict[str, int]:
        """Turns every layer into plain LoRA on its kept triplets at the target budget; returns {module: rank}.

        The adapter's LoraConfig gets an exact `rank_pattern` and `alpha_pattern` entry per module (scale
        unchanged), modules with rank 0 are dropped and excluded; `lorakit.save_adapter` then writes it.
        """
        name = adapter_name or self.adapter_name
        if name != self.adapter_name:
            raise ConfigError(f"this controller drives adapter {self.adapter_name!r}, not {name!r}")
        if not self.frozen or self.budget != self.target_budget:
            if any(self.ipt[n] for n in self.layers):
                self.mask_to_budget(self.target_budget)
            else:  # never trained: keep the first target_r triplets of each module
                self.mask = {n: torch.arange(m.numel()) < self.target_r for n, m in self.mask.items()}
            self.frozen = True
        config = copy.deepcopy(adapter_configs(model)[name])
        ranks, dropped = {}, []
        for n, layer in self.layers.items():
            A, P = self._factors(n)
            keep = self.mask[n].to(A.Q.device)
            r = int(keep.sum())
            if r == 0:
                layer.delete_adapter(name)
                dropped.append(n)
                continue
            new_A = nn.Linear(A.Q.shape[1], r, bias=False, device=A.Q.device, dtype=A.Q.dtype)
            new_B = nn.Linear(r, P.shape[0], bias=False, device=P.device, dtype=P.dtype)
            new_A.weight.copy_(A.E[keep, None] * A.Q[keep])
            new_B.weight.copy_(P[:, keep])
            trainable = A.Q.requires_grad
            new_A.weight.requires_grad_(trainable)
            new_B.weight.requires_grad_(trainable)
            layer.lora_A[name], layer.lora_B[name] = new_A, new_B
            layer.r[name] = r
            ranks[n] = r
        scale = {n: self.layers[n].scaling[name] for n in ranks}
        config.rank_pattern = dict(ranks)  # a full module name matches only itself in PEFT's pattern rule
        config.alpha_pattern = {n: alpha_for_scale(scale[n], r, config.use_rslora) for n, r in ranks.items()}
        config.r = self.target_r
        if dropped:
            config.exclude_modules = _excluding(config.exclude_modules, dropped)
        set_adapter_configs(model, {**adapter_configs(model), name: config})
        self.layers = {n: self.layers[n] for n in ranks}
        return ranks


def _excluding(exclude, names: list[str]):
    """Returns an exclude_modules value that also excludes the full module `names`."""
    if exclude is None:
        return sorted(names)
    if isinstance(exclude, list):
        return sorted(set(exclude) | set(names))
    import re
    return f"(?:{exclude})|" + "|".join(re.escape(n) for n in names)  # a string is a full-name regex


# ---------------------------------------------------------------------------- entry point
def enable_adaptive_rank(model: nn.Module, init_r: int | None = None, target_r: int = 4, total_steps: int = 100,
                         warmup: int = 0, final: int = 0, beta1: float = 0.85, beta2: float = 0.85,
                         orth_reg: float = 0.1, adapter_name: str = "default", interval: int = 1,
                         seed: int | None = None) -> AdaptiveRank:
    """Returns the controller after turning adapter `adapter_name`'s linear layers into P·diag(λ)·Q triplets.

    The adapter must already be injected. Every layer restarts at AdaLoRA's init (P, Q ~ N(0, 0.02), λ = 0,
    so the model output is unchanged) with rank `init_r` (default: the rank it has). The scale s of each layer
    is its LoRA scale at that rank (alpha/r0). `warmup` steps run at full rank, the last `final` steps at
    the target with the mask frozen; defaults follow PEFT's AdaLoraConfig (beta1 = beta2 = 0.85).
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ConfigError(f"adaptive rank: no adapter {adapter_name!r} on this model; inject one first "
                          f"(adapters here: {', '.join(configs) or 'none'})")
    config = configs[adapter_name]
    if config.use_dora:
        raise ConfigError("adaptive rank does not combine with use_dora")
    if config.init_lora_weights in ("pissa", "olora"):
        raise ConfigError(f"adaptive rank restarts the factors; init_lora_weights={config.init_lora_weights!r} "
                          f"changed the base weights and cannot be combined with it")
    layers: dict[str, LoraLinear] = {}
    for n, layer in lora_layers(model):
        if adapter_name not in layer.r:
            continue
        if type(layer) is not LoraLinear or isinstance(layer, LoraMergedLinear):
            raise ConfigError(f"adaptive rank supports plain linear layers only; {n} is a {type(layer).__name__}")
        layers[n] = layer
    if not layers:
        raise ConfigError(f"adaptive rank: adapter {adapter_name!r} adapts no layer")
    for value, what in ((total_steps, "total_steps"), (interval, "interval")):
        if value < 1:
            raise ConfigError(f"adaptive rank: {what} must be >= 1, got {value}")
    if warmup < 0 or final < 0 or warmup + final > total_steps:
        raise ConfigError(f"adaptive rank: need 0 <= warmup + final <= total_steps, got warmup={warmup}, "
                          f"final={final}, total_steps={total_steps}")
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ConfigError(f"adaptive rank: beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
    if orth_reg < 0:
        raise ConfigError(f"adaptive rank: orth_reg must be >= 0, got {orth_reg}")
    r0 = {n: init_r if init_r is not None else layer.r[adapter_name] for n, layer in layers.items()}
    if min(r0.values()) < 1:
        raise ConfigError(f"adaptive rank: init_r must be >= 1, got {init_r}")
    if target_r < 1 or target_r * len(layers) > sum(r0.values()):
        raise ConfigError(f"adaptive rank: target_r={target_r} must be >= 1 and at most the initial average rank "
                          f"{sum(r0.values()) / len(layers):g}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for n, layer in layers.items():
        old_A, old_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        trainable, device, dtype = old_A.requires_grad, old_A.device, old_A.dtype
        r = r0[n]
        Q = torch.randn(r, layer.in_features, generator=generator) * 0.02
        P = torch.randn(layer.out_features, r, generator=generator) * 0.02
        factor = TripletFactor(Q.to(device, dtype), torch.zeros(r, device=device, dtype=dtype))
        new_B = nn.Linear(r, layer.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            new_B.weight.copy_(P)
        for p in (factor.Q, factor.E, new_B.weight):
            p.requires_grad_(trainable)
        layer.lora_A[adapter_name], layer.lora_B[adapter_name] = factor, new_B
        if r != layer.r[adapter_name]:
            alpha = layer.lora_alpha[adapter_name]
            layer.r[adapter_name] = r
            layer.scaling[adapter_name] = lora_scale(alpha, r, config.use_rslora)
    return AdaptiveRank(layers, adapter_name, target_r, total_steps, warmup, final, beta1, beta2, orth_reg,
                        interval)
