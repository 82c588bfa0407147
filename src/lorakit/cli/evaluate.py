"""`lorakit eval`: held-out accuracy (exact match of the generated answer) and loss of a model + adapter.

    lorakit eval --adapter runs/X/adapter                        the embedded held-out split
    lorakit eval --model DIR --adapter runs/X/adapter --data held_out.jsonl --json

Rows are Alpaca records (instruction, input, output; an optional 'task' column groups the accuracy). The
answer is generated greedily from the training prompt and compared after normalisation (first line, case,
surrounding punctuation). The loss is the mean cross-entropy per response token. --json prints ONE object:
{"accuracy", "loss", "n", "per_task", "model", "adapter", "data"}.
"""
from __future__ import annotations

import argparse
import json
import math


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `eval` and returns its parser."""
    p = subparsers.add_parser("eval", help="held-out accuracy and loss of a model with a LoRA adapter",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="base model (default: the run's model, else the embedded default)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder run its own Python code (off by default)")
    p.add_argument("--adapter", default=None, help="adapter folder, run folder or checkpoint folder (default: none, base model)")
    p.add_argument("--data", default=None, help="Alpaca rows: JSON/JSONL, .parquet, .csv, a dataset folder or hub id (default: the "
                   "embedded held-out split)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--template", choices=("auto", "chat", "alpaca"), default=None,
                   help="prompt template (default: the adapter's run template, else auto)")
    p.add_argument("--system", default=None, help="system prompt for chat templates (default: the run's)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=None,
                   help="dtype of the base's weights that are not 4-bit (default: the adapter's run's, else auto: "
                        "float32 on CPU, the checkpoint's stored dtype on CUDA)")
    p.add_argument("--quantize", choices=("none", "nf4", "nf4-gptq"), default=None,
                   help="quantize the base to 4-bit NF4 before loading the adapter, as QLoRA trains it; nf4-gptq "
                        "redoes the run's GPTQ calibration (default: what the adapter's run used, else none)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch (default: 16)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default: 8)")
    p.add_argument("--max-seq-len", type=int, default=256, help="truncate rows for the loss (default: 256)")
    p.add_argument("--limit", type=int, default=None, help="use at most N rows (default: all)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows instead of stopping")
    p.add_argument("--columns", default=None, metavar="FIELD=COL,...",
                   help="read Alpaca fields from other columns: instruction=question,output=answer")
    p.add_argument("--data-split", default=None, help="split of a dataset (default: validation/test, else train)")
    p.add_argument("--data-config", default=None, help="configuration name of a hub dataset")
    p.add_argument("--no-merge", action="store_true", help="keep the adapter unmerged (default: fold it into the "
                   "base weights for the eval, as serving does; the same answers, less work per token)")
    p.set_defaults(func=run)
    return p


def evaluate(args: argparse.Namespace) -> dict:
    """Returns {accuracy, loss, n, per_task, model, adapter, data} for the parsed arguments."""
    from lorakit.errors import ConfigError, DataError
    from lorakit.train.data import embedded_dataset, load_records
    from lorakit.train.evaluate import evaluate_accuracy
    from lorakit.train.inference import load_for_inference, merge_for_inference

    for name in ("batch_size", "max_new_tokens", "max_seq_len"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.data is None:
        records = embedded_dataset()["eval"]
    else:
        from lorakit.train.data.columns import parse_columns
        try:
            columns = parse_columns(args.columns)
        except ValueError as e:
            raise ConfigError(f"--columns: {e}") from None
        records = load_records(args.data, skip_bad_rows=args.skip_bad_rows, columns=columns, split=args.data_split,
                               config=args.data_config, prefer="eval").records
    records = records[:args.limit] if args.limit else records
    if any("output" not in r for r in records):
        raise DataError(f"{args.data}: eval needs Alpaca rows with an 'output' (the expected answer)")
    model, tokenizer, template, system = load_for_inference(args.model, args.adapter, args.template, args.system,
                                                            trust_remote_code=args.trust_remote_code,
                                                            quantize=args.quantize, dtype=args.dtype)
    if args.adapter and not args.no_merge:
        merge_for_inference(model)
    # one forward per row gives its answer and its loss (lorakit.train.heldout)
    acc = evaluate_accuracy(model, tokenizer, records, template, system, args.batch_size, args.max_new_tokens,
                            with_loss=True, max_seq_len=args.max_seq_len)
    loss = acc["loss"]
    return {"accuracy": acc["accuracy"], "loss": None if math.isnan(loss) else loss, "n": acc["n"],
            "per_task": acc["per_task"], "model": getattr(model.config, "_name_or_path", args.model),
            "adapter": args.adapter, "data": args.data or "embedded held-out split"}


def run(args: argparse.Namespace) -> int:
    """Runs `lorakit eval`; returns the exit status."""
    result = evaluate(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"eval: {result['adapter'] or 'base model'} on {result['data']}")
    table.add_column("task"), table.add_column("n", justify="right"), table.add_column("accuracy", justify="right")
    for task, v in result["per_task"].items():
        table.add_row(task, str(v["n"]), f"{100 * v['accuracy']:.1f}%")
    table.add_row("overall", str(result["n"]), f"{100 * result['accuracy']:.1f}%", style="bold")
    console = Console()
    console.print(table)
    console.print(f"loss per response token: {result['loss']:.4f}" if result["loss"] is not None else "loss: n/a")
    return 0
