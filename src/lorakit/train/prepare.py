"""Model and data set-up shared by the recipe, search trials and inference: load, quantize, read, tokenize."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lorakit.errors import DataError
from lorakit.train.data import embedded_dataset, load_records, pack_examples, tokenize_records
from lorakit.train.options import TrainOptions
from lorakit.train.runtime import model_device, resolve_device

SMALL_MODEL_PARAMS = 1_000_000_000  # below this, plain NF4 rounding measurably hurts (README, QLoRA)


def prepare_model(o: TrainOptions, log=print, calibration=None):
    """Returns (model, tokenizer) loaded for the options, on o.device, quantized when quantize=nf4 (and with
    nf4-gptq when the streaming loader takes the model and `calibration` rows are given)."""
    return load_base(o, log, calibration)


def resolve_dtype(dtype: str, device) -> str | None:
    """Returns the loader's dtype for a --dtype choice: auto = float32 on CPU, the checkpoint's (None) on CUDA."""
    if dtype in (None, "auto"):
        return "float32" if torch.device(device).type == "cpu" else None
    return dtype


def streamable(spec, quantize: str | None, trust_remote_code: bool = False) -> bool:
    """True when the streaming loader takes this model: embedded default, a .gguf file or a safetensors folder
    without remote code, unquantized or quantize=nf4 (nf4-gptq and the rest keep the whole-model path)."""
    from pathlib import Path

    from lorakit.loading.pretrained import EMBEDDED_NAMES
    if quantize not in (None, "none", "nf4") or trust_remote_code:
        return False
    if spec is None or str(spec).lower() in EMBEDDED_NAMES:
        return True
    path = Path(str(spec)).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    if not (path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors"))):
        return False
    try:
        import json
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if "auto_map" in config:
        return False
    # transformers rewrites some checkpoints' layout while loading (e.g. per-expert MoE tensors into fused 3-D
    # ones); the streaming loader reads tensors under their stored names, so those models take the other path.
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    return get_checkpoint_conversion_mapping(config.get("model_type", "")) is None


def plan_or_refuse(o: TrainOptions, dtype: str | None, device):
    """Plans a Llama-style run's peak memory before loading; raises ConfigError (exit 2) when it cannot fit.

    Returns the MemoryPlan, or None where the plan does not cover the model (not a local folder with a
    Llama-style config.json: the embedded default, GGUF files, hub ids, other architectures)."""
    from pathlib import Path

    from lorakit.errors import ConfigError
    from lorakit.loading.plan import check_fits, parse_bytes, plan_memory
    budget = parse_bytes(o.memory_limit) if o.memory_limit is not None else None  # a bad size: exit 2 here
    folder = Path(str(o.model)).expanduser() if o.model is not None else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    targets = o.target_modules
    if isinstance(targets, str):
        targets = None if targets == "all-linear" else [targets]
    try:
        plan = plan_memory(folder, quantize=None if o.quantize == "none" else o.quantize, dtype=dtype, r=o.r,
                           target_modules=targets, batch_size=o.batch_size, max_seq_len=o.max_seq_len,
                           gradient_checkpointing=o.gradient_checkpointing, device=str(device), memory=budget,
                           model_name=str(o.model), mmap_tables=streamable(o.model, o.quantize if o.quantize != "none"
                                                                           else None, o.trust_remote_code))
    except ConfigError:
        return None  # not a Llama-style config (or targets the plan does not know): no plan, no refusal
    check_fits(plan, folder)
    return plan


def load_base(o: TrainOptions, log=print, calibration=None):
    """Returns (model, tokenizer): the base model of the options, on o.device, in o.dtype, quantized as asked.

    Safetensors folders, GGUF files and the embedded default load tensor by tensor (quantized to NF4 as they
    are read; lorakit.loading.load_pretrained_streaming) after the memory plan says the run fits; nf4-gptq,
    remote-code and hub models load whole (load_model -> .to(device) -> quantize).
    """
    device = resolve_device(o.device)
    dtype = resolve_dtype(o.dtype, device)
    quantize = None if o.quantize == "none" else o.quantize
    plan_or_refuse(o, dtype, device)
    if quantize:  # a quantized run is about memory: freed buffers go back to the OS at once (a few % of step time)
        from lorakit.loading.allocator import return_freed_memory_promptly
        return_freed_memory_promptly()
    if quantize == "nf4-gptq" and calibration and streamable(o.model, "nf4", o.trust_remote_code):
        # GPTQ while streaming: one decoder block in full precision at a time, activations carried forward
        from lorakit.loading.streaming import load_pretrained_streaming
        t0 = time.time()
        log(f"quantizing the base to NF4 with GPTQ rounding on {len(calibration)} calibration rows, decoder block by "
            f"decoder block while loading ...")
        model, tokenizer = load_pretrained_streaming(o.model, quantize="nf4-gptq", dtype=dtype, device=device,
                                                     calibration=calibration)
        log(f"quantized in {time.time() - t0:.0f} s")
    elif streamable(o.model, quantize, o.trust_remote_code):
        from lorakit.loading.streaming import load_pretrained_streaming
        model, tokenizer = load_pretrained_streaming(o.model, quantize=quantize, dtype=dtype, device=device)
    else:
        from lorakit.loading.pretrained import load_model
        model, tokenizer = load_model(o.model, dtype=getattr(torch, dtype) if dtype else torch.float32,
                                      trust_remote_code=o.trust_remote_code)
        model.to(device)  # before quantizing: bitsandbytes quantizes on the weight's device
        if quantize == "nf4":
            from lorakit.model.quantize import quantize as quantize_model  # optional: needs bitsandbytes
            model = quantize_model(model) or model
    if quantize == "nf4":
        n_params = sum(p.quant_state.shape.numel() if getattr(p, "quant_state", None) is not None else p.numel()
                       for p in model.parameters())
        if n_params < SMALL_MODEL_PARAMS:
            log(f"note: round-to-nearest NF4 costs small models a lot of accuracy ({n_params / 1e6:.0f}M parameters "
                f"here; README, QLoRA); --quantize nf4-gptq keeps the same 4-bit format with far less damage")
    return model, tokenizer


def load_data(o: TrainOptions, tokenizer, log=print) -> dict:
    """Returns {train_records, eval_records, data_name, skipped} for the options (embedded default or files)."""
    if o.data is None:
        ds = embedded_dataset()
        train, held, name, skipped = ds["train"], ds["eval"], "embedded default instruction dataset", 0
    else:
        loaded = load_records(o.data, skip_bad_rows=o.skip_bad_rows, columns=o.columns, split=o.data_split,
                              config=o.data_config)
        train, held, name, skipped = loaded.records, [], o.data, loaded.skipped
        if skipped:
            log(f"skipped {skipped} malformed row(s) in {o.data}")
    if o.eval_data is not None:
        loaded = load_records(o.eval_data, skip_bad_rows=o.skip_bad_rows, columns=o.columns, config=o.data_config,
                              prefer="eval")
        held = loaded.records
        if loaded.skipped:
            log(f"skipped {loaded.skipped} malformed row(s) in {o.eval_data}")
    if o.eval_limit is not None:
        held = spread(held, o.eval_limit)
    return {"train_records": train, "eval_records": held, "data_name": name, "skipped": skipped}


def spread(records: list[dict], n: int) -> list[dict]:
    """Returns n records taken round-robin over their 'task' column, so a limited eval still covers every task."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r.get("task", ""), []).append(r)
    out, i = [], 0
    while len(out) < min(n, len(records)):
        out += [rows[i] for rows in by_task.values() if i < len(rows)][: n - len(out)]
        i += 1
    return out


def tokenize_training(o: TrainOptions, records, tokenizer):
    """Returns (examples, stats) for the training rows, tokenized as the options say."""
    return tokenize_records(records, tokenizer, template=o.template, max_seq_len=o.max_seq_len,
                            train_on_inputs=o.train_on_inputs, system=o.system)


def calibration_inputs(examples: list[dict], n: int) -> list[torch.Tensor]:
    """Returns the token ids of the first n training examples (one (1, T) tensor each): GPTQ's calibration."""
    return [torch.tensor(e["input_ids"])[None] for e in examples[:n]]


def quantize_gptq(model, calibration: list[torch.Tensor], log=print) -> None:
    """Quantizes `model` to NF4 in place with GPTQ rounding on `calibration` (lorakit.quant.quantize)."""
    from lorakit.model.quantize import quantize
    device = model_device(model)
    t0 = time.time()
    log(f"quantizing the base to NF4 with GPTQ rounding on {len(calibration)} calibration rows ...")
    quantize(model, calibration=[c.to(device) for c in calibration])
    log(f"quantized in {time.time() - t0:.0f} s")


@dataclass
class RunData:
    """A run's data, read and tokenized: what the training steps and evaluations consume."""
    name: str
    train_records: list[dict]
    eval_records: list[dict]
    train_examples: list[dict]
    eval_examples: list[dict]
    pad_id: int
    skipped: int = 0
    stats: dict = field(default_factory=dict)
    calibration: list = field(default_factory=list)  # nf4-gptq: the first training rows, unpacked, as (1, T) ids


def prepare_data(o: TrainOptions, model, tokenizer, records: dict, log=print) -> RunData:
    """Returns the tokenized (packed) data for `records` (a load_data dict); quantizes `model` with GPTQ when
    asked and a model is given (it calibrates on the tokenized training rows; without a model yet, the rows
    are kept in RunData.calibration for the recipe to quantize once the model is loaded).
    """
    train_ex, stats = tokenize_training(o, records["train_records"], tokenizer)
    if not train_ex:
        raise DataError(f"{records['data_name']}: no training examples left after tokenization "
                        f"({stats['dropped']} rows lost their whole response to max_seq_len={o.max_seq_len})")
    calibration = calibration_inputs(train_ex, o.quant_calibration) if o.quantize == "nf4-gptq" else []
    if calibration and model is not None:
        quantize_gptq(model, calibration, log)
        calibration = []
    if stats["truncated"] or stats["dropped"]:
        log(f"{stats['truncated']} of {stats['rows']} rows were longer than max_seq_len={o.max_seq_len} and were "
            f"truncated ({stats['dropped']} dropped: nothing of the response was left)")
    if o.packing:
        train_ex = pack_examples(train_ex, o.max_seq_len)
    eval_ex, _ = tokenize_records(records["eval_records"], tokenizer, template=o.template, max_seq_len=o.max_seq_len,
                                  system=o.system)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return RunData(records["data_name"], list(records["train_records"]), list(records["eval_records"]), train_ex,
                   eval_ex, pad_id, records.get("skipped", 0), stats, calibration)
