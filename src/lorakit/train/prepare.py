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


def prepare_model(o: TrainOptions, log=print):
    """Returns (model, tokenizer) loaded for the options, on o.device, quantized when quantize=nf4."""
    from lorakit.loading.pretrained import load_model

    model, tokenizer = load_model(o.model, trust_remote_code=o.trust_remote_code)
    model.to(resolve_device(o.device))  # before quantizing: bitsandbytes quantizes on the weight's device
    if o.quantize == "nf4":
        from lorakit.model.quantize import quantize  # optional: needs bitsandbytes
        n_params = sum(p.numel() for p in model.parameters())
        model = quantize(model) or model
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
        loaded = load_records(o.data, skip_bad_rows=o.skip_bad_rows)
        train, held, name, skipped = loaded.records, [], o.data, loaded.skipped
        if skipped:
            log(f"skipped {skipped} malformed row(s) in {o.data}")
    if o.eval_data is not None:
        loaded = load_records(o.eval_data, skip_bad_rows=o.skip_bad_rows)
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


def prepare_data(o: TrainOptions, model, tokenizer, records: dict, log=print) -> RunData:
    """Returns the tokenized (packed) data for `records` (a load_data dict); quantizes with GPTQ when asked.

    GPTQ runs here because it calibrates on the tokenized training rows.
    """
    train_ex, stats = tokenize_training(o, records["train_records"], tokenizer)
    if not train_ex:
        raise DataError(f"{records['data_name']}: no training examples left after tokenization "
                        f"({stats['dropped']} rows lost their whole response to max_seq_len={o.max_seq_len})")
    if o.quantize == "nf4-gptq":
        quantize_gptq(model, calibration_inputs(train_ex, o.quant_calibration), log)
    if stats["truncated"] or stats["dropped"]:
        log(f"{stats['truncated']} of {stats['rows']} rows were longer than max_seq_len={o.max_seq_len} and were "
            f"truncated ({stats['dropped']} dropped: nothing of the response was left)")
    if o.packing:
        train_ex = pack_examples(train_ex, o.max_seq_len)
    eval_ex, _ = tokenize_records(records["eval_records"], tokenizer, template=o.template, max_seq_len=o.max_seq_len,
                                  system=o.system)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return RunData(records["data_name"], list(records["train_records"]), list(records["eval_records"]), train_ex,
                   eval_ex, pad_id, records.get("skipped", 0), stats)
