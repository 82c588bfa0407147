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
from lorakit.ops import recompute
from lorakit.ops.nf4_experts import dense_experts, expert_tensors, quantized_experts


def owner_of(module: nn.Module) -> nn.Module:
    """Returns the real module under a (possibly nested) chain of LoraParam wrappers."""
    while isinstance(module, LoraParam):
        module = module.base_layer
    return module


class LoraParam(LoraLayer):
    """LoRA on one parameter (2-D or 3-D, experts first) of `base_layer`; wraps the module, not the tensor."""

    kind = "param"
    recompute_weight = True  # class default; set False on an instance to keep W_eff for backward instead

    def __init__(self, base_layer: nn.Module, parameter_name: str):
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        owner = owner_of(base_layer)
        p = expert_tensors(owner).get(parameter_name)  # a parameter, or its NF4 store (same shape)
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
        """Returns the parameter, or its NF4 store (lorakit.ops.nf4_experts) when the experts are 4-bit."""
        return expert_tensors(self.owner)[self.parameter_name]

    def _store(self):
        return quantized_experts(self.owner).get(self.parameter_name)

    def read_base_fp32(self) -> torch.Tensor:
        store = self._store()
        return store.dequantize().float() if store is not None else super().read_base_fp32()

    def write_base_fp32(self, w32: torch.Tensor) -> None:
        store = self._store()
        if store is not None:  # merging into 4-bit experts re-quantizes them, as LoraLinear does on Linear4bit
            store.requantize(w32)
        else:
            super().write_base_fp32(w32)

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
        owner = self.owner
        with dense_experts(owner):  # 4-bit experts: each tensor dequantized for this call (no-op otherwise)
            if self._grouped_ok(owner):
                return self._grouped_forward(owner, *args, **kwargs)
            return self._effective_weight_forward(owner, live, *args, **kwargs)

    def _effective_weight_forward(self, owner, live, *args, **kwargs):
        pname = self.parameter_name
        if self.row_adapters is not None:
            raise ConfigError(f"adapter_names (mixed-adapter batches) is not supported on {type(owner).__name__} "
                              f"({self.parameter_name}): lorakit runs per-row adapters only through the grouped "
                              f"experts path (transformers' experts modules); run one adapter per call instead")
        bound = pname in owner.__dict__  # a 4-bit tensor, dequantized into a workspace by dense_experts
        W = owner.__dict__[pname] if bound else owner._parameters[pname]
        with torch.autocast(device_type=W.device.type, enabled=False):
            W_eff = self.effective_weight(W, live)
        recompute_ok = (self.recompute_weight and W_eff.requires_grad and torch.is_grad_enabled()
                        and recompute.hook_state() != "foreign")
        key = None
        if recompute_ok:
            # a bound workspace holds another layer's weight by backward: dequantize again from the codes
            base = (lambda: quantized_experts(owner)[pname].dequantize()) if bound else (lambda: W)
            key = recompute.register(W_eff, recompute.whole(lambda: self.effective_weight(base(), live).detach()))
        if bound:
            owner.__dict__[pname] = W_eff
        else:
            del owner._parameters[pname]
            owner.__dict__[pname] = W_eff
        try:
            if not recompute_ok:
                return self.base_layer(*args, **kwargs)
            with recompute.hooks():
                return self.base_layer(*args, **kwargs)
        finally:
            if bound:
                owner.__dict__[pname] = W
            else:
                del owner.__dict__[pname]
                owner._parameters[pname] = W
            if key is not None:
                recompute.release(key)

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
