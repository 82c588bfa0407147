"""LoRA on a parameter of a module (PEFT's `target_parameters`): fused 3-D expert tensors and plain 2-D weights.

A mixture-of-experts layer in transformers 5 keeps its routed experts as 3-D parameters, e.g.
`experts.gate_up_proj` of shape (experts, out, in) (or (experts, in, out) when the module says `is_transposed`).
`LoraParam` gives every expert e its own rank-r update:

    W_e' = W_e + s·B_e·A_e          A_e: r×in, B_e: out×r

and stores the factors in PEFT's ParamWrapper layout, so adapters move both ways unchanged:
    lora_A.weight: (r·E, in)        rows e·r .. e·r+r-1 are A_e
    lora_B.weight: (out, r·E)       column j·E+e is column j of B_e  (PEFT's "o r e" ordering)

The forward hands the experts module its own parameter name bound to W + s·B·A for the duration of the call
(one batched matmul over all experts), so the module's own routing and grouped kernels run unchanged and
exactly. For training, the effective weight is not kept for backward: a saved-tensor hook recomputes it from
W, A and B when autograd needs it, so LoRA on the experts costs no extra full-size tensor per layer.

Like PEFT's ParamWrapper, several parameters of one module are wrapped by nesting: the first registered
parameter is the innermost wrapper (`experts.base_layer`), which is also how PEFT names the keys.
"""
from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers.base import LoraLayer


def owner_of(module: nn.Module) -> nn.Module:
    """Returns the real module under a (possibly nested) chain of LoraParam wrappers."""
    while isinstance(module, LoraParam):
        module = module.base_layer
    return module


_RECIPES: dict[int, object] = {}  # storage pointer of a live W_eff -> a function rebuilding it


def _pack(t: torch.Tensor):
    rebuild = _RECIPES.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
    if rebuild is None:
        return t
    return (_pack, rebuild, t.shape, t.stride(), t.storage_offset())


def _unpack(packed):
    if isinstance(packed, tuple) and packed and packed[0] is _pack:
        _, rebuild, shape, stride, offset = packed
        with torch.no_grad():
            return rebuild().as_strided(shape, stride, offset)
    return packed


def _foreign_saved_tensor_hooks() -> bool:
    # Another saved-tensor hook (e.g. non-reentrant activation checkpointing) must keep control: ours would
    # shadow it for every tensor saved inside the experts module.
    try:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except Exception:  # private API moved: do not recompute
        return True
    return top is not None and top[0] is not _pack


class LoraParam(LoraLayer):
    """LoRA on one parameter (2-D or 3-D, experts first) of `base_layer`; wraps the module, not the tensor."""

    kind = "param"
    recompute_weight = True  # class default; set False on an instance to keep W_eff for backward instead

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        owner = owner_of(base_layer)
        p = owner._parameters.get(parameter_name)
        if p is None:
            raise ConfigError(f"target_parameters: {type(owner).__name__} has no parameter {parameter_name!r}")
        self.is_transposed = bool(getattr(owner, "is_transposed", False)) and p.dim() == 3
        if p.dim() == 3:
            self.num_experts = p.shape[0]
            a, b = p.shape[1], p.shape[2]
            self.in_features, self.out_features = (a, b) if self.is_transposed else (b, a)
        elif p.dim() == 2:
            self.num_experts = 1
            self.out_features, self.in_features = p.shape
        else:
            raise ConfigError(f"target_parameters: {parameter_name} has {p.dim()} dimensions; LoRA on a parameter "
                              f"needs a 2-D weight or a 3-D (experts, ...) tensor")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    # ---------------------------------------------------------------- creation
    def create_factors(self, name: str, r: int) -> None:
        if self.dropout_p[name] > 0:
            raise ConfigError(f"target_parameters ({self.parameter_name}): lora_dropout must be 0; the input of a "
                              f"parameter's product cannot be separated from the module's forward (as in PEFT)")
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def factors(self, name):
        return self.lora_A[name].weight, self.lora_B[name].weight

    # ---------------------------------------------------------------- weights
    @property
    def owner(self) -> nn.Module:
        """Returns the module that holds the parameter (under any nested wrappers)."""
        return owner_of(self.base_layer)

    @property
    def base_weight(self) -> torch.Tensor:
        return self.owner._parameters[self.parameter_name]

    def expert_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (lhs, rhs) with delta = scale·lhs@rhs shaped like the parameter: (E, out, r)@(E, r, in), or
        (E, in, r)@(E, r, out) when the experts are stored transposed; 2-D parameters give plain matrices."""
        A, B = self.factors(name)
        if self.num_experts == 1:
            return B, A
        E = self.num_experts
        A3 = A.view(E, -1, A.shape[-1])                      # (E, r, in)
        B3 = B.view(B.shape[0], -1, E).permute(2, 0, 1)      # (E, out, r)
        if self.is_transposed:
            return A3.transpose(1, 2), B3.transpose(1, 2)
        return B3, A3

    def delta_weight(self, name: str) -> torch.Tensor:
        lhs, rhs = self.expert_factors(name)
        return self.scaling[name] * (lhs.detach().float() @ rhs.detach().float())

    def effective_weight(self, W: torch.Tensor, names) -> torch.Tensor:
        """Returns W + Σ scale·lhs@rhs over `names` (differentiable in the factors), in W's dtype."""
        out = W
        for name in names:
            lhs, rhs = self.expert_factors(name)
            lhs, rhs = lhs.to(W.dtype), rhs.to(W.dtype)
            if lhs.dim() == 3:
                out = torch.baddbmm(out, lhs, rhs, alpha=self.scaling[name])
            else:
                out = torch.addmm(out, lhs, rhs, alpha=self.scaling[name])
        return out

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        live = self.live
        if not live:
            return self.base_layer(*args, **kwargs)
        owner, pname = self.owner, self.parameter_name
        if self._grouped_ok(owner):
            return self._grouped_forward(owner, *args, **kwargs)
        if self.row_adapters is not None:
            raise ConfigError(f"adapter_names (mixed-adapter batches) is not supported on {type(owner).__name__} "
                              f"({self.parameter_name}): lorakit runs per-row adapters only through the grouped "
                              f"experts path (transformers' experts modules); run one adapter per call instead")
        W = owner._parameters[pname]
        with torch.autocast(device_type=W.device.type, enabled=False):
            W_eff = self.effective_weight(W, live)
        recompute = (self.recompute_weight and W_eff.requires_grad and torch.is_grad_enabled()
                     and not _foreign_saved_tensor_hooks())
        key = W_eff.untyped_storage().data_ptr()
        if recompute:
            _RECIPES[key] = lambda: self.effective_weight(W, live).detach()
        del owner._parameters[pname]
        owner.__dict__[pname] = W_eff
        try:
            if not recompute:
                return self.base_layer(*args, **kwargs)
            with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
                return self.base_layer(*args, **kwargs)
        finally:
            del owner.__dict__[pname]
            owner._parameters[pname] = W
            _RECIPES.pop(key, None)

    # ---------------------------------------------------------------- grouped path (lorakit.layers.experts)
    use_grouped = True  # class default; False forces the effective-weight path

    def _chain(self) -> list["LoraParam"]:
        chain, layer = [], self
        while isinstance(layer, LoraParam):
            chain.append(layer)
            layer = layer.base_layer
        return chain

    def _grouped_ok(self, owner) -> bool:
        ok = self.__dict__.get("_grouped_cache")
        if ok is None:
            from lorakit.layers import experts
            ok = (experts.supports(owner) and all(l.num_experts > 1 and l.parameter_name in experts.projection_names()
                                                  for l in self._chain()))
            self.__dict__["_grouped_cache"] = ok
        return ok and self.use_grouped

    def _grouped_forward(self, owner, hidden_states, top_k_index=None, top_k_weights=None, **kwargs):
        from lorakit.layers.experts import lora_experts_forward
        if top_k_index is None or top_k_weights is None or kwargs:
            raise ConfigError(f"{type(owner).__name__}: unexpected call signature for an experts module")
        loras = {}
        for layer in self._chain():
            entries = []
            for name in layer.live:
                A, B = layer.factors(name)
                E = layer.num_experts
                entries.append((A.view(E, -1, A.shape[-1]), B.view(B.shape[0], -1, E).permute(2, 0, 1).contiguous(),
                                layer.scaling[name], name))
            loras[layer.parameter_name] = entries
        return lora_experts_forward(owner, loras, hidden_states, top_k_index, top_k_weights, self.row_adapters)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, " + super().extra_repr()
