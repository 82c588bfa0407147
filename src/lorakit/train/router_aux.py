"""The MoE router's auxiliary (load-balancing) loss in training: option `router_aux_loss`.

Mixture-of-experts models report a load-balancing loss of their routers (`output_router_logits=True` gives
`output.aux_loss`); training adds `weight · aux_loss` to the mean next-token loss, the weight being the
option or, when unset, the model config's router_aux_loss_coef when its config sets output_router_logits.
"""
from __future__ import annotations

from torch import nn

from lorakit.errors import ConfigError

AUX_ATTR = "lorakit_router_aux_loss"


def set_router_aux_loss(model: nn.Module, option: float | None) -> float:
    """Sets and returns the weight of the router's load-balancing loss in training: `option`, or (None) the
    model config's router_aux_loss_coef when the config sets output_router_logits, else 0."""
    cfg = getattr(model, "config", None)
    if option is None:
        option = getattr(cfg, "router_aux_loss_coef", 0.0) if getattr(cfg, "output_router_logits", False) else 0.0
    coef = float(option or 0.0)
    if coef < 0:
        raise ConfigError(f"router_aux_loss must be >= 0, got {coef}")
    if coef and not hasattr(cfg, "output_router_logits"):
        raise ConfigError(f"router_aux_loss={coef}: {type(model).__name__} reports no router auxiliary loss "
                          f"(its config has no output_router_logits)")
    object.__setattr__(model, AUX_ATTR, coef)
    return coef


def _weight(model: nn.Module) -> float:
    # a DDP / FSDP wrapper keeps the model in .module
    return getattr(model, AUX_ATTR, None) or getattr(getattr(model, "module", None), AUX_ATTR, 0.0)


def router_aux_kwargs(model: nn.Module) -> dict:
    """Returns the forward keyword that makes the model report its router loss (training with a weight only)."""
    return {"output_router_logits": True} if model.training and _weight(model) else {}


def add_router_aux(loss_sum, output, n: int, model: nn.Module):
    """Returns loss_sum + weight · aux_loss · n (loss_sum is a sum over n target tokens) when it applies."""
    coef = _weight(model)
    aux = getattr(output, "aux_loss", None)
    if not (model.training and coef) or aux is None:
        return loss_sum
    return loss_sum + coef * aux.to(loss_sum.dtype) * n
