"""An adapter as updates to named base tensors, applied one tensor at a time (fp32 arithmetic).

    W' = W + s·B·A                         LoRA on a linear weight (s = alpha/r, or alpha/sqrt(r) with rsLoRA,
                                            per-module rank_pattern / alpha_pattern)
    W' = m / ||W + s·B·A||_row · (W + s·B·A)   DoRA
    E' = E + s·(B·A)ᵀ                      LoRA on an embedding (PEFT's lora_embedding_A/B)
    T' = saved tensor                      modules_to_save (trained copies of whole modules, e.g. lm_head)

Keys follow PEFT's adapter file: `base_model.model.<module>.lora_A.weight` updates `<module>.weight`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import LorakitError

PREFIX = "base_model.model."


class NotStreamableError(LorakitError):
    """The adapter needs the model's modules to merge (fused GPT-2 style layers, an untied head); merge in memory."""


class AdapterMismatchError(LorakitError):
    """The adapter does not fit the base model (a module it updates is missing or has another shape)."""


@dataclass
class Update:
    """The update of one base tensor."""
    kind: str                       # "linear", "embedding"
    A: torch.Tensor                 # (r, in) for linear, (r, num_embeddings) for embedding
    B: torch.Tensor                 # (out, r) for linear, (dim, r) for embedding
    scale: float
    magnitude: torch.Tensor | None = None   # DoRA

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> torch.Tensor:
        d = self.scale * (self.B.float() @ self.A.float())
        return d.t() if self.kind == "embedding" else d


class AdapterUpdates:
    """Per-tensor updates read from a PEFT-format adapter folder."""

    def __init__(self, adapter_dir: str | Path, allow_pickle: bool = False):
        import lorakit
        self.folder = Path(adapter_dir)
        self.config, tensors = lorakit.read_adapter(self.folder, allow_pickle=allow_pickle)
        if self.config.fan_in_fan_out or self.config.enable_lora:
            raise NotStreamableError(f"{self.folder}: fan_in_fan_out / enable_lora adapters (GPT-2 style fused layers) "
                                     f"cannot be merged tensor by tensor; `lorakit merge` merges them in memory.")
        factors: dict[str, dict[str, torch.Tensor]] = {}
        self.replacements: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "eA"),
                                 (".lora_embedding_B", "eB"), (".lora_magnitude_vector.weight", "m"),
                                 (".lora_magnitude_vector", "m")):
                if name.endswith(suffix):
                    factors.setdefault(name[: -len(suffix)], {})[part] = t
                    break
            else:
                self.replacements[name] = t
        self.updates: dict[str, Update] = {}
        for module, parts in factors.items():
            embedding = "eA" in parts or "eB" in parts
            A, B = (parts.get("eA"), parts.get("eB")) if embedding else (parts.get("A"), parts.get("B"))
            if A is None or B is None:
                raise LorakitError(f"{self.folder}: {module} has only one of its two LoRA factors; the file is incomplete.")
            self.updates[module + ".weight"] = Update("embedding" if embedding else "linear", A.float(), B.float(),
                                                      self.config.scale_for(module, int(A.shape[0])),
                                                      parts["m"].float().reshape(-1) if "m" in parts else None)

    @property
    def uses_dora(self) -> bool:
        return any(u.magnitude is not None for u in self.updates.values())

    def check(self, shapes: dict[str, tuple[int, ...]], where: str) -> None:
        """Raises AdapterMismatchError unless every tensor the adapter touches exists in `shapes` with its shape."""
        for name, u in self.updates.items():
            if name not in shapes:
                raise AdapterMismatchError(
                    f"the adapter {self.folder} updates {name}, which {where} does not have: adapter and base model do "
                    f"not match (was it trained on another model? see base_model_name_or_path in adapter_config.json).")
            want = tuple(u.delta().shape) if u.kind == "linear" else (u.A.shape[1], u.B.shape[0])
            if tuple(shapes[name]) != want:
                raise AdapterMismatchError(f"the adapter's update of {name} has shape {list(want)}, the base's weight "
                                           f"{list(shapes[name])} in {where}: adapter and base model do not match.")
        for name, t in self.replacements.items():
            if name not in shapes:
                raise AdapterMismatchError(f"the adapter {self.folder} replaces {name}, which {where} does not have: "
                                           f"adapter and base model do not match.")
            if tuple(t.shape) != tuple(shapes[name]):
                raise AdapterMismatchError(f"the adapter's {name} has shape {list(t.shape)}, the base's "
                                           f"{list(shapes[name])} in {where}: adapter and base model do not match.")

    def touches(self, name: str) -> bool:
        return name in self.updates or name in self.replacements

    def apply(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """Returns tensor `name` with the adapter folded in (fp32); the input itself when the adapter leaves it alone."""
        if name in self.replacements:
            return self.replacements[name].float()
        u = self.updates.get(name)
        if u is None:
            return weight
        w = weight.float() + u.delta()
        if u.magnitude is not None:
            w = w * (u.magnitude / torch.linalg.norm(w, dim=1))[:, None]
        return w
