"""Training options: ONE dataclass, loaded from YAML with `key=value` overrides; defaults = the default run.

    TrainOptions()                                   the default run (`lorakit train` with no arguments)
    load_options("run.yaml", ["lr=1e-4", "r=16"])    YAML file (yaml.safe_load), then overrides, type-checked

Every LoraConfig field is an option too (flat: `r`, `lora_alpha`, `target_modules`...), so one YAML file holds
a whole run. Unknown keys raise ConfigError with "did you mean"; values are coerced to the field's type
("1e-4" -> 0.0001, "true" -> True, "q_proj,v_proj" -> ["q_proj", "v_proj"]) or rejected with a clear error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, did_you_mean

# LoraConfig fields that are not user options: they are set from the run itself.
_LORA_DERIVED = {"base_model_name_or_path", "revision", "inference_mode"}


def _opt(default, help: str):
    """Returns a dataclass field carrying its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class _RunOptions:
    """The run's own options (model, data, optimization, evaluation); the LoRA fields follow them."""

    # -- model and data
    model: str = _opt("default", "base model: 'default' (embedded SmolLM2-135M-Instruct), a transformers "
                      "folder, a .gguf file, or a hub id")
    data: str | None = _opt(None, "training data: JSON/JSONL (Alpaca, chat 'messages' or ShareGPT "
                            "'conversations'), .parquet, .csv, .txt, a `datasets` folder, or a hub dataset id "
                            "(datasets.load_dataset); none = the embedded default instruction dataset")
    data_split: str | None = _opt(None, "split of a --data dataset (datasets.load_dataset, e.g. train or "
                                  "train[:1000]); none = train")
    data_config: str | None = _opt(None, "configuration name of a --data hub dataset (load_dataset's name)")
    columns: dict[str, str] = _opt({}, "read a format's fields from other columns: instruction=question,"
                                   "output=answer (also input, messages, conversations, text)")
    eval_data: str | None = _opt(None, "held-out data for loss and accuracy; none = the embedded held-out split "
                                 "(with the default data) or no eval (with --data)")
    out: str | None = _opt(None, "output folder; none = runs/<YYYYmmdd-HHMMSS>")
    resume: str | None = _opt(None, "'latest' (the newest complete checkpoint in --out, or the newest run in "
                              "runs/), an output folder, or a checkpoint folder")
    trust_remote_code: bool = _opt(False, "let a model folder run its own Python code (auto_map); only for "
                                          "models whose authors you trust")
    template: str = _opt("auto", "prompt template: auto (chat template when the tokenizer has one), chat, alpaca")
    system: str | None = _opt(None, "system prompt for chat templates")
    max_seq_len: int = _opt(256, "longest example in tokens; longer rows are truncated (and counted)")
    train_on_inputs: bool = _opt(False, "also train on prompt tokens (default: loss on the response only)")
    packing: bool = _opt(False, "pack several examples into each max_seq_len block")
    group_by_length: bool = _opt(False, "batch rows of similar length together (sorted within shuffled windows of "
                                 "50 batches, then the batches shuffled): ~no padding, a deterministic, resumable "
                                 "order; off by default: on the default data it makes batches single-task and the "
                                 "60-step run learns less (docs/JOB.md)")
    padding_free: bool | None = _opt(None, "each batch as ONE row: its examples back to back with their own position ids "
                              "(no padding at all, the same loss per example; sdpa models attend per example, others "
                              "through a block-diagonal mask). "
                              "Default: on where that is exact (Llama-style models: llama, mistral, qwen2, qwen3, "
                              "phi3), off elsewhere")
    skip_bad_rows: bool = _opt(False, "skip malformed data rows (and count them) instead of stopping")
    eval_limit: int | None = _opt(None, "use at most this many held-out rows")
    # -- optimization
    max_steps: int | None = _opt(60, "optimizer steps; none = run `epochs` full epochs")
    epochs: float = _opt(1.0, "epochs when max_steps is none")
    batch_size: int = _opt(8, "examples per micro-batch (per device)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    adam_betas: list[float] = _opt([0.9, 0.999], "AdamW betas")
    warmup_steps: int = _opt(6, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = _opt(0.0, "the cosine schedule ends at lr * min_lr_ratio")
    lora_plus_ratio: float = _opt(1.0, "LoRA+: the B matrices learn at lr * ratio (1 = plain LoRA; paper: 16)")
    max_grad_norm: float | None = _opt(1.0, "clip the gradient norm to this; none = no clipping")
    router_aux_loss: float | None = _opt(None, "MoE models: weight of the routers' load-balancing loss added to the "
                                         "training loss; none = the model config's router_aux_loss_coef when "
                                         "it sets output_router_logits, else 0")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward (less memory, slower steps; README, Performance)")
    offload_activations: bool = _opt(False, "with gradient_checkpointing on CUDA: keep the checkpointed "
                                     "activations in (pinned) CPU memory instead of GPU memory")
    compile: bool = _opt(False, "torch.compile each decoder block for the training forward (one graph reused by "
                         "every block; eval and generation stay eager): compiling takes a while up front, then each step "
                         "is faster with less peak memory, so it pays off on long runs (README, Performance)")
    nan_policy: str = _opt("stop", "on a NaN/Inf loss: stop (keep the last good checkpoint) or skip the step")
    seed: int = _opt(42, "seed for LoRA init, dropout and data order")
    quantize: str = _opt("none", "quantize the frozen base: none, nf4 (QLoRA: round to nearest) or nf4-gptq "
                         "(same NF4 format, codes chosen by GPTQ on calibration rows: less damage to small models)")
    quant_calibration: int = _opt(64, "nf4-gptq: training examples used as calibration inputs")
    strategy: str = _opt("auto", "several processes (torchrun): ddp, fsdp (shard the frozen base), or auto "
                         "(ddp when launched with several processes); see docs/distributed.md")
    device: str = _opt("auto", "where to train: auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu, "
                       "cuda, cuda:N")
    dtype: str = _opt("auto", "dtype of the frozen weights that are not 4-bit, and of compute: auto (default) = "
                      "float32 on CPU (bf16 math is slow there; same as before), the checkpoint's stored dtype "
                      "on CUDA; float32, bfloat16 (a bf16 checkpoint stays bf16: half the memory) or float16")
    memory_limit: str | None = _opt(None, "memory budget the run must fit, e.g. 24GiB (default: available "
                                    "memory); a Llama-style run planned above it is refused before loading")
    # -- evaluation, checkpoints, logging
    eval_every: int = _opt(20, "eval loss every N steps (0 = only at the end)")
    save_every: int = _opt(50, "write a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _opt(2, "keep the newest N checkpoints (0 = keep all)")
    final_eval_loss: bool | None = _opt(None, "held-out loss after training as a pass of its own: true, false, or "
                                        "none = only when accuracy is off (then it is the run's held-out result); "
                                        "with accuracy on, the accuracy pass reports it from the same forward")
    baseline_eval: bool = _opt(True, "measure the un-tuned model's accuracy before training")
    accuracy: bool = _opt(True, "measure generation accuracy (exact match) on the held-out data")
    eval_batch_size: int = _opt(16, "prompts per generation batch")
    max_new_tokens: int = _opt(5, "generation length limit for accuracy (answers are short)")
    log_every: int = _opt(1, "write a metrics.jsonl line every N steps")
    progress: bool = _opt(True, "show a progress bar (on a terminal) or print a plain progress line every "
                          "progress_every steps (when the output is a file or pipe)")
    progress_every: int | None = _opt(None, "plain progress lines (output not a terminal) every N steps; "
                                      "none = a twentieth of the run")
    report_to: list[str] = _opt(["none"], "experiment trackers that get metrics.jsonl's metrics and the config: "
                                "tensorboard, mlflow, trackio, wandb (offline, local files in the run folder), "
                                "all (the installed ones) or none")


# The LoRA options are LoraConfig's own fields (a new LoRA option is added in config.py only); the training
# defaults that differ from LoraConfig's, and the --help texts, live here.
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
LORA_TYPES: dict[str, Any] = {  # narrower than LoraConfig's, so that command-line strings coerce as before
    "layers_to_transform": list[int] | None, "init_lora_weights": str}
LORA_HELP = {
    "r": "LoRA rank", "lora_alpha": "LoRA alpha (update scale = alpha / r)",
    "lora_dropout": "dropout on the LoRA input",
    "target_modules": "modules to adapt: names, a regex, or all-linear", "exclude_modules": "modules never to adapt",
    "target_parameters": "module parameters to adapt (MoE experts), e.g. experts.gate_up_proj,experts.down_proj",
    "layers_to_transform": "adapt only these layer indices", "layers_pattern": "name of the layer list (PEFT field)",
    "rank_pattern": "per-module ranks {pattern: r}", "alpha_pattern": "per-module alphas {pattern: alpha}",
    "init_lora_weights": "LoRA init: kaiming, gaussian, pissa, olora, none",
    "use_rslora": "rank-stabilized scale alpha / sqrt(r)", "use_dora": "DoRA (weight-decomposed LoRA)",
    "bias": "train biases: none, all, lora_only",
    "modules_to_save": "modules trained in full and saved with the adapter",
    "fan_in_fan_out": "base weights stored (in, out) (GPT-2 Conv1D; detected automatically)",
    "enable_lora": "fused projections: {pattern: [True, False, True]}",
    "task_type": "PEFT task type written to adapter_config.json",
}


def lora_field_names() -> list[str]:
    """Returns the LoraConfig fields that are training options."""
    return [f.name for f in dataclasses.fields(LoraConfig) if f.name not in _LORA_DERIVED]


def _lora_option_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """Returns (name, type, field) for every LoRA option, with the training default and help text."""
    hints, out = typing.get_type_hints(LoraConfig), []
    for f in dataclasses.fields(LoraConfig):
        if f.name in _LORA_DERIVED:
            continue
        default = LORA_DEFAULTS.get(f.name, f.default if f.default is not dataclasses.MISSING
                                    else f.default_factory())
        help_text = LORA_HELP.get(f.name) or f.metadata.get("help") or "see lorakit.LoraConfig"
        out.append((f.name, LORA_TYPES.get(f.name, hints[f.name]), _opt(default, help_text)))
    return out


_LoraOptions = dataclasses.make_dataclass("_LoraOptions", _lora_option_fields(), bases=(_RunOptions,))


@dataclass
class TrainOptions(_LoraOptions):
    """Everything a training run needs. Field order is the order of `lorakit train --help`."""

    # -- adaptive rank (AdaLoRA-style, lorakit.adaptive): start at r, end at an average of adaptive_target_r
    adaptive_rank: bool = _opt(False, "prune the least important singular directions during training, from r "
                               "down to an average of adaptive_target_r per module; saves per-module ranks")
    adaptive_target_r: int | None = _opt(None, "average rank at the end; none = r // 2")
    adaptive_warmup: int | None = _opt(None, "steps at full rank before pruning starts; none = a tenth of the steps")
    adaptive_final: int | None = _opt(None, "last steps at the target budget with the ranks frozen; "
                                      "none = a fifth of the steps")
    adaptive_orth_reg: float = _opt(0.1, "weight of the orthogonality penalty on the P, Q factors")
    adaptive_interval: int = _opt(1, "re-allocate the ranks every N steps")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the first invalid option."""
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"option {name}: {why}")

        for name in ("batch_size", "grad_accum", "max_seq_len", "eval_batch_size", "max_new_tokens", "log_every"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.progress_every is not None and self.progress_every < 1:
            bad("progress_every", f"must be >= 1 (or none), got {self.progress_every}")
        from lorakit.train.trackers import check_report_to
        try:
            check_report_to(self.report_to)
        except ValueError as e:
            bad("report_to", str(e))
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", f"must be >= 1 (or none to use epochs), got {self.max_steps}")
        if self.epochs <= 0:
            bad("epochs", f"must be > 0, got {self.epochs}")
        if self.lr <= 0:
            bad("lr", f"must be > 0, got {self.lr}")
        if self.offload_activations and not self.gradient_checkpointing:
            bad("offload_activations", "needs gradient_checkpointing (it moves the checkpointed activations); "
                "add --gradient-checkpointing")
        if self.compile and self.quantize != "none":
            bad("compile", f"does not work with quantize={self.quantize} yet (torch.compile cannot trace the "
                "4-bit bitsandbytes layers); drop --compile, or train without --quantize")
        if self.quant_calibration < 1:
            bad("quant_calibration", f"must be >= 1, got {self.quant_calibration}")
        if self.lora_plus_ratio <= 0:
            bad("lora_plus_ratio", f"must be > 0, got {self.lora_plus_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            bad("adam_betas", f"need two numbers in [0, 1), got {self.adam_betas}")
        choices = {"nan_policy": ("stop", "skip"), "quantize": ("none", "nf4", "nf4-gptq"),
                   "dtype": ("auto", "float32", "bfloat16", "float16"),
                   "strategy": ("auto", "none", "ddp", "fsdp"),
                   "template": ("auto", "chat", "alpaca")}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                bad(name, f"must be one of {', '.join(allowed)}, got {value!r}.{did_you_mean(str(value), allowed)}")
        self.lora_config()  # LoraConfig validates the LoRA fields
        if self.device != "auto":
            try:
                import torch
                torch.device(self.device)
            except (RuntimeError, ValueError):
                bad("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.adaptive_rank:
            target = self.adaptive_target()
            if not 1 <= target <= self.r:
                bad("adaptive_target_r", f"must be in [1, r={self.r}], got {target}")
            for name in ("adaptive_warmup", "adaptive_final"):
                if getattr(self, name) is not None and getattr(self, name) < 0:
                    bad(name, f"must be >= 0, got {getattr(self, name)}")
            if self.adaptive_orth_reg < 0:
                bad("adaptive_orth_reg", f"must be >= 0, got {self.adaptive_orth_reg}")
            if self.adaptive_interval < 1:
                bad("adaptive_interval", f"must be >= 1, got {self.adaptive_interval}")

    def adaptive_target(self) -> int:
        """Returns the average rank adaptive training ends at (adaptive_target_r, else r // 2)."""
        return self.adaptive_target_r if self.adaptive_target_r is not None else max(1, self.r // 2)

    def adaptive_phases(self, n_steps: int) -> tuple[int, int]:
        """Returns (warmup, final) step counts of the adaptive budget schedule for a run of n_steps."""
        warmup = self.adaptive_warmup if self.adaptive_warmup is not None else n_steps // 10
        final = self.adaptive_final if self.adaptive_final is not None else n_steps // 5
        return warmup, final

    def lora_config(self) -> LoraConfig:
        """Returns the LoraConfig these options describe."""
        return LoraConfig(**{name: getattr(self, name) for name in lora_field_names()})

    def to_dict(self) -> dict[str, Any]:
        """Returns the options as plain YAML-able data."""
        return dataclasses.asdict(self)


def option_fields() -> list[dataclasses.Field]:
    """Returns the TrainOptions fields in --help order."""
    return list(dataclasses.fields(TrainOptions))


_HINTS: dict[str, Any] = {}


def _hint(name: str):
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainOptions))
    return _HINTS[name]


def _type_name(tp) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _coerce_to(value, tp, name: str):
    """Returns `value` converted to the type `tp`, or raises TypeError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            if type(None) in args:
                return None
        if isinstance(value, str) and str in args and any(typing.get_origin(a) is list for a in args):
            # target_modules-like: "all-linear" and regexes stay strings; "q_proj" or "q_proj,v_proj" are lists
            text = value.strip()
            if text == "all-linear" or (not text.startswith("[") and any(c in text for c in "*+?^$()|\\")):
                return text
        errors = []
        # Try non-str members first so "16" becomes an int and "q_proj,v_proj" a list before plain str.
        for member in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce_to(value, member, name)
            except TypeError as e:
                errors.append(str(e))
        raise TypeError(errors[-1] if errors else f"expected {_type_name(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.strip().lower() in ("true", "yes", "on", "1")
        raise TypeError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise TypeError(f"expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise TypeError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError(f"expected a string, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r}")
        return [_coerce_to(v, args[0], name) for v in value] if args else value
    if origin is dict:
        if isinstance(value, str) and "=" in value and not value.strip().startswith("{"):
            pairs = [part.partition("=") for part in value.split(",")]  # a=b,c=d
            if not all(sep and k.strip() for k, sep, _ in pairs):
                raise TypeError(f"expected key=value pairs like a=b,c=d, got {value!r}")
            value = {k.strip(): v.strip() for k, _, v in pairs}
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise TypeError(f"expected a mapping like {{a: 1}}, got {value!r}") from None
        if not isinstance(value, dict):
            raise TypeError(f"expected a mapping like {{a: 1}}, got {value!r}")
        return {str(k): _coerce_to(v, args[1], name) for k, v in value.items()} if args else value
    raise TypeError(f"unsupported option type {_type_name(tp)}")


def coerce(name: str, value):
    """Returns `value` converted to option `name`'s type; ConfigError for unknown names or wrong types."""
    names = [f.name for f in option_fields()]
    if name not in names:
        raise ConfigError(f"unknown option {name!r}.{did_you_mean(name, names)} "
                          f"(`lorakit train --help` lists every option)")
    try:
        return _coerce_to(value, _hint(name), name)
    except TypeError as e:
        raise ConfigError(f"option {name}: {e} (type: {_type_name(_hint(name))})") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Returns (name, value) from 'key=value'; ConfigError when it is not of that form."""
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not sep or not key:
        raise ConfigError(f"expected key=value, got {text!r}")
    return key, coerce(key, value)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Returns the options in a YAML (or JSON) file, coerced and checked."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f", line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"config file {p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of option: value, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        try:
            out[str(key)] = coerce(str(key), value)
        except ConfigError as e:
            raise ConfigError(f"config file {p}: {e}") from None
    return out


def load_options(config: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] = (),
                 base: dict[str, Any] | None = None) -> TrainOptions:
    """Returns TrainOptions from defaults < base < the YAML file < overrides ('key=value' strings or a dict)."""
    values: dict[str, Any] = {}
    for key, value in (base or {}).items():
        values[key] = coerce(key, value)
    if config:
        values.update(read_config_file(config))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        values[key] = coerce(key, value)
    return TrainOptions(**values)


def dump_yaml(options: TrainOptions) -> str:
    """Returns the options as YAML text that load_options reads back to equal options."""
    # json round trip: plain lists/dicts only, so safe_load reads exactly what was written
    return yaml.safe_dump(json.loads(json.dumps(options.to_dict())), sort_keys=False, default_flow_style=None)
