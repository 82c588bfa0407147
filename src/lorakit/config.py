"""LoraConfig: what to adapt and how, validated at construction, spoken in PEFT's field names.

`LoraConfig.to_peft_dict()` / `LoraConfig.from_peft_dict()` map to and from PEFT's `adapter_config.json`,
which is lorakit's native adapter format.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError, did_you_mean

INIT_METHODS = ("kaiming", "gaussian", "pissa", "olora", "none")
BIAS_MODES = ("none", "all", "lora_only")

# PEFT fields that lorakit reads as "off" when they hold these values; anything else is refused on load.
_PEFT_INERT = {
    "alora_invocation_tokens": (None,), "arrow_config": (None,), "corda_config": (None,), "eva_config": (None,),
    "kasa_config": (None,), "layer_replication": (None,), "loftq_config": ({}, None), "lora_bias": (False,),
    "lora_ga_config": (None,), "megatron_config": (None,), "monteclora_config": (None,),
    "target_parameters": (None, []), "trainable_token_indices": (None,), "use_bdlora": (None, False),
    "use_qalora": (False,), "velora_config": (None,),
}
# PEFT fields that carry no meaning for lorakit's math and are ignored on load.
_PEFT_IGNORED = {
    "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config",
    "use_qalora", "layers_pattern",
}


@dataclass
class LoraConfig:
    """The LoRA recipe. Field names follow PEFT's LoraConfig wherever PEFT has the field.

    target_modules: a list of module-name suffixes ("q_proj" matches "model.layers.0.self_attn.q_proj"),
        a string regex that must match the FULL module name, "all-linear" (every linear layer except the
        output head), or None (a per-architecture default: the attention query and value projections).
    enable_lora: lorakit's fused-projection option (loralib's MergedLinear): {name pattern: [True, False, True]}
        adapts only the chosen equal slices of a fused output, e.g. q and v of GPT-2's `c_attn`.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: str | bool = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    fan_in_fan_out: bool = False
    enable_lora: dict[str, list[bool]] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.init_lora_weights, bool):
            self.init_lora_weights = "kaiming" if self.init_lora_weights else "none"
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raises ConfigError naming the first invalid field and why."""
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"LoraConfig.{name}: {why}")

        if not _is_int(self.r) or self.r <= 0:
            bad("r", f"the rank must be a positive integer, got {self.r!r}")
        if not _is_num(self.lora_alpha) or self.lora_alpha <= 0:
            bad("lora_alpha", f"must be a positive number, got {self.lora_alpha!r}")
        if not _is_num(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                bad(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.init_lora_weights not in INIT_METHODS:
            bad("init_lora_weights", f"unknown init {self.init_lora_weights!r}; choose one of "
                f"{', '.join(INIT_METHODS)} (or True/False).{did_you_mean(str(self.init_lora_weights), INIT_METHODS)}")
        if self.bias not in BIAS_MODES:
            bad("bias", f"unknown bias mode {self.bias!r}; choose one of {', '.join(BIAS_MODES)}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                if value != "all-linear":
                    try:
                        re.compile(value)
                    except re.error as e:
                        bad(name, f"{value!r} is not a valid regular expression ({e})")
            elif not (isinstance(value, list) and value and all(isinstance(t, str) and t for t in value)):
                bad(name, f"must be a non-empty list of module names, a regex string or 'all-linear', got {value!r}")
        if self.layers_to_transform is not None:
            if not (isinstance(self.layers_to_transform, list)
                    and all(_is_int(i) and i >= 0 for i in self.layers_to_transform)):
                bad("layers_to_transform", f"must be a list of layer indices >= 0, got {self.layers_to_transform!r}")
        for key, value in self.rank_pattern.items():
            if not _is_int(value) or value <= 0:
                bad("rank_pattern", f"rank for {key!r} must be a positive integer, got {value!r}")
        for key, value in self.alpha_pattern.items():
            if not _is_num(value) or value <= 0:
                bad("alpha_pattern", f"alpha for {key!r} must be a positive number, got {value!r}")
        if self.modules_to_save is not None and not all(isinstance(m, str) and m for m in self.modules_to_save):
            bad("modules_to_save", f"must be a list of module names, got {self.modules_to_save!r}")
        if self.enable_lora is not None:
            if not isinstance(self.enable_lora, dict):
                bad("enable_lora", "must map a module name to a list of booleans, e.g. {'c_attn': [True, False, True]}")
            for key, mask in self.enable_lora.items():
                if not (isinstance(mask, list) and mask and all(isinstance(b, bool) for b in mask) and any(mask)):
                    bad("enable_lora", f"{key!r}: need a list of booleans with at least one True, got {mask!r}")
        if self.use_dora and self.enable_lora:
            bad("use_dora", "DoRA is not supported together with enable_lora (fused slices)")

    # ----------------------------------------------------------------- per-module resolution
    def rank_for(self, module_name: str) -> int:
        """Returns the rank for a module: the rank_pattern entry that matches its name, else r."""
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        """Returns lora_alpha for a module: the alpha_pattern entry that matches its name, else lora_alpha."""
        return float(_pattern_value(self.alpha_pattern, module_name, self.lora_alpha))

    def scale_for(self, module_name: str, rank: int | None = None) -> float:
        """Returns the update scale of a module: alpha/r, or alpha/sqrt(r) with use_rslora."""
        r = self.rank_for(module_name) if rank is None else rank
        return lora_scale(self.alpha_for(module_name), r, self.use_rslora)

    def slices_for(self, module_name: str) -> list[bool] | None:
        """Returns the enable_lora slice mask for a fused module, or None for a plain one."""
        return _pattern_value(self.enable_lora or {}, module_name, None)

    # ----------------------------------------------------------------- PEFT mapping
    def to_peft_dict(self) -> dict[str, Any]:
        """Returns the adapter_config.json content PEFT's LoraConfig reads."""
        d = dataclasses.asdict(self)
        d.pop("enable_lora")  # saved adapters express fused slices as plain LoRA (see lorakit.io)
        init = d["init_lora_weights"]
        d["init_lora_weights"] = {"kaiming": True, "none": False}.get(init, init)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        d.update(peft_type="LORA", lora_bias=False, layer_replication=None, loftq_config={},
                 megatron_config=None, megatron_core="megatron.core", target_parameters=None,
                 trainable_token_indices=None, use_qalora=False, qalora_group_size=16, eva_config=None,
                 corda_config=None, auto_mapping=None)
        return d

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Returns a LoraConfig from an adapter_config.json dict (PEFT's or lorakit's); refuses unsupported options."""
        data = dict(data)
        peft_type = data.pop("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ConfigError(f"adapter_config.json: peft_type is {peft_type!r}; lorakit reads LoRA adapters only")
        for key, inert in _PEFT_INERT.items():
            if key in data and data.pop(key) not in inert:
                raise ConfigError(f"adapter_config.json: {key} is set; lorakit does not support this PEFT option")
        for key in _PEFT_IGNORED:
            data.pop(key, None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(f"adapter_config.json: unknown field {unknown[0]!r}.{did_you_mean(unknown[0], names)}")
        if isinstance(data.get("init_lora_weights"), str) and data["init_lora_weights"].startswith("pissa"):
            data["init_lora_weights"] = "pissa"
        return cls(**data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Returns a LoraConfig from plain keyword data, with 'did you mean' for unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown LoRA option {key!r}.{did_you_mean(key, names)}")
        return cls(**data)


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """Returns the update scale s of h = W0·x + s·B·A·x: alpha/r, or alpha/sqrt(r) with rsLoRA (the one formula)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def alpha_for_scale(scale: float, r: int, use_rslora: bool = False) -> float:
    """Returns the lora_alpha that gives update scale `scale` at rank r (the inverse of lora_scale)."""
    return scale * (math.sqrt(r) if use_rslora else r)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    # PEFT semantics: a key matches when it is a suffix of the module name at a '.' boundary, read as a regex.
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module_name):
            return value
    return default
