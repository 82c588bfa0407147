"""How much memory a LoRA/QLoRA run will need, from config.json alone (no weights), and whether it fits.

    peak = max(loading, training)
    loading  = runtime + frozen weights + the largest stored tensor (+ bitsandbytes' fp32 copy of it)
    training = runtime + frozen weights + LoRA (weights + gradients + AdamW's 2 states)
             + activations (all of each block's saved tensors, or with gradient checkpointing each block's
               input + one block's saved tensors during its recomputation) + the loss head
             + the dequantization workspace (4-bit: one buffer the size of the largest layer)

Embedding tables and the output head that the streaming loader keeps in their stored dtype on the CPU are
views of the checkpoint's memory map (lorakit.loading.streaming): page cache, not private memory, listed apart
and not counted in the peak (the kernel can drop those pages and read them again when memory runs short).

Frozen weights: NF4 + double quantization is 0.5 byte per weight + 1 byte per 64 (absmax, 8-bit) + 4 bytes
per 64*256 (the absmax's own scale) = 0.5159 byte/param; embeddings, the output head and norms stay in the
storage dtype. The activation constants (elements saved per token and layer) were measured with torch on
Llama-shaped models (see tests/loading/test_memory_plan.py and docs/BIG_MODELS.md).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorakit.errors import ConfigError

GiB = 2 ** 30
NF4_DQ_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
CHUNKED_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # lorakit's chunked loss head
HEAD_BLOCK_ELEMENTS = 1 << 22
# Measured constants (docs/BIG_MODELS.md, "How the plan was calibrated"):
RUNTIME_BYTES = {"cpu": 255 * 2 ** 20, "cuda": 520 * 2 ** 20}  # interpreter + torch + transformers + tokenizer
BNB_RUNTIME_BYTES = 45 * 2 ** 20  # + bitsandbytes and its CPU kernels
ACT_HIDDEN = 16     # elements saved per token, per layer, per hidden unit (norms, q/k/v/o inputs, rope, attention)
ACT_INTER = 6       # ... per MLP unit (gate, up, act, product, down input)
ACT_RECOMPUTE = 1.0  # with checkpointing: one block's saved set + its gradient temporaries, in block-sets
# (2.0 until 2026-11-28 had absorbed heap fragmentation; re-measured on the 1B/8B shapes and tests/loading/
# test_memory_plan.py with freed memory returned to the OS, lorakit.loading.allocator)
ALLOCATOR_SLACK = 1.06  # heap fragmentation / caching allocator rounding on everything allocated at run time


def parse_bytes(text: str | int | float) -> int:
    """Returns bytes for '24GiB', '24G', '24 GB', '512MiB', '1.5T' or a number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"memory size {text!r}: write it like 24GiB, 16GB, 512MiB or a number of bytes")
    unit = m.group(2).upper()
    base = 1000 if (m.group(3) or "").upper() == "B" and unit else 1024
    return int(float(m.group(1)) * base ** " KMGT".index(unit or " "))


def format_bytes(n: float) -> str:
    if abs(n) >= GiB / 4:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2 ** 20:.0f} MiB" if abs(n) >= 2 ** 20 or n == 0 else f"{n / 1024:.0f} KiB"


def available_memory(device: str = "cpu") -> int:
    """Returns the memory a run may use: CUDA total memory of the current GPU, else the machine's MemAvailable."""
    if str(device).startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available here; pass --memory instead")
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return psutil.virtual_memory().available


def read_config(config_or_path) -> dict:
    """Returns a model config as a dict from a dict, a transformers config, a folder or a config.json path."""
    if isinstance(config_or_path, dict):
        return dict(config_or_path)
    if hasattr(config_or_path, "to_dict"):
        return config_or_path.to_dict()
    path = Path(os.path.expanduser(str(config_or_path)))
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"plan: {path} does not exist; pass a model folder with config.json, or a config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"plan: {path} is not readable JSON ({e})") from None
    return cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}


@dataclass
class Shape:
    """The numbers of a Llama-style decoder that memory depends on."""
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str
    model_type: str

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in need if not cfg.get(k)]
        if missing:
            raise ConfigError(f"plan: config.json has no {', '.join(missing)}; the plan covers Llama-style decoders "
                              f"(llama, mistral, qwen2/3, phi3, gemma, ...)")
        heads = int(cfg["num_attention_heads"])
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
        return cls(hidden=int(cfg["hidden_size"]), inter=int(cfg["intermediate_size"]),
                   layers=int(cfg["num_hidden_layers"]), heads=heads,
                   kv_heads=int(cfg.get("num_key_value_heads") or heads),
                   head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                   vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
                   dtype=dtype if dtype in DTYPE_BYTES else "float32", model_type=str(cfg.get("model_type", "")))

    def linears(self) -> dict[str, tuple[int, int]]:
        """{name: (in, out)} of one block's linear layers."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.inter
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def parameters(self) -> int:
        block = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden
        return self.layers * block + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden


@dataclass
class MemoryPlan:
    """A run's predicted memory, in bytes, broken down; `str(plan)` prints it."""
    model: str
    options: dict
    parts: dict = field(default_factory=dict)  # name -> bytes (training peak's terms)
    frozen_by_dtype: dict = field(default_factory=dict)
    mapped: dict = field(default_factory=dict)  # memory-mapped frozen tables (page cache, not in the peak)
    loading_peak: int = 0
    training_peak: int = 0
    activations_other: int = 0  # activations with gradient checkpointing flipped
    budget: int = 0
    max_batch: int = 0  # at the planned max_seq_len
    max_seq_len: int = 0  # at the planned batch size

    @property
    def peak(self) -> int:
        return max(self.loading_peak, self.training_peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(peak=self.peak, fits=self.fits)
        return d

    def __str__(self) -> str:
        o = self.options
        gc = o["gradient_checkpointing"]
        lines = [f"Memory plan for {self.model}: {o['parameters'] / 1e9:.2f}B parameters, "
                 f"{o['quantize'] or 'no quantization'}, dtype {o['dtype']}, LoRA r={o['r']} on "
                 f"{', '.join(o['targets'])}, batch {o['batch_size']} x {o['max_seq_len']} tokens, gradient "
                 f"checkpointing {'on' if gc else 'off'}, device {o['device']}",
                 "  frozen weights"]
        for k, v in self.frozen_by_dtype.items():
            lines.append(f"    {k:<36}{format_bytes(v):>12}")
        for k, v in self.mapped.items():
            lines.append(f"    {k:<36}{format_bytes(v):>12}  (memory-mapped: page cache, not in the peak)")
        for k, v in self.parts.items():
            if k != "frozen weights":
                lines.append(f"  {k:<38}{format_bytes(v):>12}")
        lines.append(f"  (activations with checkpointing {'off' if gc else 'on'}: "
                     f"{format_bytes(self.activations_other)})")
        lines.append(f"  {'loading peak':<38}{format_bytes(self.loading_peak):>12}")
        lines.append(f"  {'training peak':<38}{format_bytes(self.training_peak):>12}")
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  peak {format_bytes(self.peak)} of {format_bytes(self.budget)} available: {verdict}")
        if self.max_batch or self.max_seq_len:
            lines.append(f"  largest that fits: batch {self.max_batch} x {o['max_seq_len']} tokens; "
                         f"batch {o['batch_size']} x {self.max_seq_len} tokens")
        else:
            lines.append("  nothing fits with these options, not even batch 1 x 1 token")
        return "\n".join(lines)


def _activation_bytes(s: Shape, batch: int, seq: int, e: int, checkpointing: bool, r: int) -> int:
    tokens = batch * seq
    per_layer = tokens * (ACT_HIDDEN * s.hidden + ACT_INTER * s.inter + 7 * r) * e
    if checkpointing:
        return s.layers * tokens * s.hidden * e + int(ACT_RECOMPUTE * per_layer)
    return s.layers * per_layer


def _head_bytes(s: Shape, batch: int, seq: int, e: int) -> int:
    tokens = batch * seq
    if s.model_type in CHUNKED_HEAD_MODEL_TYPES:
        chunk = max(16, HEAD_BLOCK_ELEMENTS // s.vocab)
        # the selected hidden states and their gradient, plus a few (chunk x vocab) fp32 blocks
        return 3 * tokens * s.hidden * e + 3 * min(chunk, tokens) * s.vocab * 4
    # full logits in the model's dtype, their fp32 copy, log-softmax and its gradient
    return tokens * s.vocab * (e + 3 * 4)


def plan_memory(config_or_path, *, quantize: str | None = None, dtype: str | None = None, r: int = 16,
                target_modules=None, batch_size: int = 1, max_seq_len: int = 512,
                gradient_checkpointing: bool = False, device: str = "cpu", memory=None,
                model_name: str | None = None, mmap_tables: bool = True) -> MemoryPlan:
    """Returns the MemoryPlan of a LoRA (quantize=None) or QLoRA ("nf4", "nf4-gptq") run of the model.

    dtype: the storage/compute dtype (None: config.json's torch_dtype, as the streaming loader keeps it);
    target_modules: None/"all-linear" (q, k, v, o, gate, up, down) or a list of those names; memory: the
    budget ('24GiB' or bytes; None: this machine's MemAvailable, or the GPU's total memory for cuda);
    mmap_tables: the run loads with the streaming loader, which maps the embedding tables and output head
    kept in their stored dtype on the CPU (not counted in the peak).
    """
    cfg = read_config(config_or_path)
    s = Shape.from_config(cfg)
    if quantize not in (None, "nf4", "nf4-gptq", "fp4"):
        raise ConfigError(f"plan: quantize={quantize!r}; choose nf4 (or none)")
    dtype = (str(dtype).replace("torch.", "") if dtype else s.dtype)
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"plan: dtype={dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    for name, v in (("r", r), ("batch_size", batch_size), ("max_seq_len", max_seq_len)):
        if int(v) < 1:
            raise ConfigError(f"plan: {name}={v} must be >= 1")
    targets = list(ALL_LINEAR) if target_modules in (None, "all-linear") else list(target_modules)
    unknown = [t for t in targets if t not in ALL_LINEAR]
    if unknown:
        raise ConfigError(f"plan: target_modules {unknown} are not Llama-style linear names ({', '.join(ALL_LINEAR)})")
    e = DTYPE_BYTES[dtype]
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    budget = parse_bytes(memory) if memory is not None else available_memory(device)
    lin = s.linears()
    linear_params = s.layers * sum(a * b for a, b in lin.values())
    emb = s.vocab * s.hidden
    frozen = {}
    if quantize:
        frozen["linear layers, NF4 + double quant"] = math.ceil(linear_params * NF4_DQ_BYTES_PER_PARAM)
    else:
        frozen[f"linear layers, {dtype}"] = linear_params * e
    stored_e = DTYPE_BYTES[s.dtype]
    mapped = {}
    # the streaming loader maps tables kept as stored: same dtype, or a 4-bit run computing wider (upcast on use)
    if mmap_tables and dev == "cpu" and (dtype == s.dtype or (quantize and e > stored_e)):
        mapped[f"embeddings{'' if s.tied else ' + output head'}, {s.dtype}"] = emb * stored_e * (1 if s.tied else 2)
    else:
        frozen[f"embeddings{'' if s.tied else ' + output head'}, {dtype}"] = emb * e * (1 if s.tied else 2)
    frozen[f"norms, {dtype}"] = (2 * s.layers + 1) * s.hidden * e
    frozen_total = sum(frozen.values())
    lora_params = s.layers * sum(r * (lin[t][0] + lin[t][1]) for t in targets)
    le = 4 if quantize else e  # LoRA factors: fp32 on a 4-bit base, else the base's dtype
    largest = max(a * b for a, b in lin.values())

    runtime = RUNTIME_BYTES[dev] + (BNB_RUNTIME_BYTES if quantize else 0)

    def training(batch: int, seq: int, gc: bool) -> tuple[int, dict]:
        parts = {
            "frozen weights": frozen_total,
            "LoRA weights": lora_params * le,
            "LoRA gradients": lora_params * le,
            "AdamW state (2 per LoRA weight)": 2 * lora_params * le,
            f"activations (checkpointing {'on' if gc else 'off'})": _activation_bytes(s, batch, seq, e, gc, r),
            "loss head": _head_bytes(s, batch, seq, e),
            "dequantization workspace": largest * e if quantize else 0,
            "runtime (interpreter, torch, ...)": runtime,
        }
        run_time = sum(v for k, v in parts.items() if k not in ("frozen weights", "runtime (interpreter, torch, ...)"))
        parts["allocator slack"] = int((ALLOCATOR_SLACK - 1) * run_time)
        return sum(parts.values()), parts

    total, parts = training(batch_size, max_seq_len, gradient_checkpointing)
    biggest_stored = (largest if mapped else max(emb, largest)) * stored_e
    loading = runtime + frozen_total + biggest_stored + (largest * 4 * 2 if quantize else 0)

    def fits(batch, seq):
        return max(loading, training(batch, seq, gradient_checkpointing)[0]) <= budget

    def largest_fitting(f, hi=1 << 20):
        if not f(1):
            return 0
        lo = 1
        while lo < hi and f(min(hi, lo * 2)):
            lo = min(hi, lo * 2)
        step = lo // 2
        while step >= 1:
            if lo + step <= hi and f(lo + step):
                lo += step
            step //= 2
        return lo

    options = dict(quantize=quantize, dtype=dtype, r=r, targets=targets, batch_size=batch_size,
                   max_seq_len=max_seq_len, gradient_checkpointing=gradient_checkpointing, device=str(device),
                   parameters=s.parameters(), mmap_tables=mmap_tables)
    return MemoryPlan(model=model_name or str(cfg.get("_name_or_path") or config_or_path if not isinstance(
                          config_or_path, dict) else cfg.get("_name_or_path", "model")),
                      options=options, parts=parts, frozen_by_dtype=frozen, mapped=mapped, loading_peak=loading,
                      training_peak=total,
                      activations_other=_activation_bytes(s, batch_size, max_seq_len, e, not gradient_checkpointing, r),
                      budget=budget, max_batch=largest_fitting(lambda b: fits(b, max_seq_len)),
                      max_seq_len=largest_fitting(lambda q: fits(batch_size, q)))


def _suggestions(plan: MemoryPlan, config_or_path) -> list[str]:
    o = plan.options
    tries = []
    if not o["gradient_checkpointing"]:
        tries.append(("--gradient-checkpointing", dict(gradient_checkpointing=True)))
    if not o["quantize"]:
        tries.append(("--quantize nf4", dict(quantize="nf4")))
        tries.append(("--quantize nf4 --gradient-checkpointing", dict(quantize="nf4", gradient_checkpointing=True)))
    if o["dtype"] == "float32":
        tries.append(("--dtype bfloat16", dict(dtype="bfloat16")))
    out = []
    for flag, change in tries:
        p = replan(plan, config_or_path, **change)
        if p.fits:
            out.append(f"{flag} (peak {format_bytes(p.peak)})")
    if plan.max_batch >= 1 and plan.max_batch < o["batch_size"]:
        out.append(f"--batch-size {plan.max_batch}")
    if 1 <= plan.max_seq_len < o["max_seq_len"]:
        out.append(f"--max-seq-len {plan.max_seq_len}")
    return out


def check_fits(plan: MemoryPlan, config_or_path=None) -> None:
    """Returns None when the plan fits its budget; else raises ConfigError with the plan and what would fit."""
    if plan.fits:
        return None
    hints = _suggestions(plan, config_or_path) if config_or_path is not None else []
    if plan.max_batch >= 1 and plan.max_batch < plan.options["batch_size"] and not hints:
        hints.append(f"--batch-size {plan.max_batch}")
    if 1 <= plan.max_seq_len < plan.options["max_seq_len"] and not any("max-seq-len" in h for h in hints):
        hints.append(f"--max-seq-len {plan.max_seq_len}")
    advice = ("Options that would fit: " + "; ".join(hints) + ".") if hints else \
        "No option lorakit has would make this model fit: use a machine with more memory."
    raise ConfigError(f"this run needs about {format_bytes(plan.peak)} but only {format_bytes(plan.budget)} is "
                      f"available, so it would be killed partway. The plan:\n{plan}\n{advice} "
                      f"(lorakit plan shows the same breakdown.)")


def replan(plan: MemoryPlan, config_or_path, **changes) -> MemoryPlan:
    """Returns the plan of the same run with some options changed (keyword names as plan_memory's)."""
    o = plan.options
    base = dict(quantize=o["quantize"], dtype=o["dtype"], r=o["r"], target_modules=o["targets"],
                batch_size=o["batch_size"], max_seq_len=o["max_seq_len"],
                gradient_checkpointing=o["gradient_checkpointing"], device=o["device"], memory=plan.budget,
                model_name=plan.model, mmap_tables=o.get("mmap_tables", True))
    return plan_memory(config_or_path, **{**base, **changes})


__all__ = ["MemoryPlan", "plan_memory", "check_fits", "replan", "parse_bytes", "format_bytes", "available_memory",
           "read_config", "Shape"]
