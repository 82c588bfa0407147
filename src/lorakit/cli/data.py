"""`lorakit data`: read, validate and tokenize a data set as `lorakit train` would, and show what gets trained.

    lorakit data --show 2                              the embedded default dataset, embedded model's tokenizer
    lorakit data --show 3 train.jsonl --model DIR      rows rendered by DIR's template, trained tokens marked
    lorakit data --show 1 chats.parquet --columns messages=dialog
    lorakit data --show 2 tatsu-lab/alpaca --data-split train[:100]     (hub datasets need a network)

Trained tokens are coloured on a terminal and wrapped in ⟦ ⟧ otherwise; the counts cover every row (rows,
tokens, trained tokens, truncated). A malformed row stops with its file, row and field (exit 2), as in training.
Only the tokenizer is loaded, never the model weights.
"""
from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `data` and returns its parser."""
    p = subparsers.add_parser("data", help="check a data set and show its rows with the trained tokens marked",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("data", nargs="?", default=None, metavar="DATA",
                   help="JSON/JSONL (Alpaca, chat, ShareGPT), .parquet, .csv, .txt, a dataset folder or hub id "
                        "(default: the embedded training data)")
    p.add_argument("--show", type=int, default=2, metavar="N", help="rows to print (default: 2; 0 = counts only)")
    p.add_argument("--model", default="default", help="model whose tokenizer and chat template render the rows "
                                                      "(default: the embedded SmolLM2)")
    p.add_argument("--trust-remote-code", action="store_true", help="let the model folder run its own code")
    p.add_argument("--template", choices=("auto", "chat", "alpaca"), default="auto", help="prompt template")
    p.add_argument("--system", default=None, help="system prompt for chat templates")
    p.add_argument("--max-seq-len", type=int, default=256, help="truncate rows to this many tokens (default: 256)")
    p.add_argument("--train-on-inputs", action="store_true", help="also train on prompt tokens")
    p.add_argument("--columns", default=None, metavar="FIELD=COL,...",
                   help="read a format's fields from other columns: instruction=question,output=answer")
    p.add_argument("--data-split", default=None, help="split of a dataset (default: train)")
    p.add_argument("--data-config", default=None, help="configuration name of a hub dataset")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip malformed rows (and count them)")
    p.add_argument("--json", action="store_true", help="print one JSON object: counts and the shown rows")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Runs `lorakit data`; returns the exit status."""
    from lorakit.errors import ConfigError
    from lorakit.loading.tokenizer import load_tokenizer
    from lorakit.train.data import embedded_dataset, load_records
    from lorakit.train.data.columns import parse_columns
    from lorakit.train.preview import counts_line, data_preview, plain_text, token_runs

    if args.show < 0 or args.max_seq_len < 1:
        raise ConfigError("--show must be >= 0 and --max-seq-len >= 1")
    try:
        columns = parse_columns(args.columns)
    except ValueError as e:
        raise ConfigError(f"--columns: {e}") from None
    if args.data is None:
        records, kind, skipped, name = embedded_dataset()["train"], "alpaca", 0, "embedded default training data"
    else:
        loaded = load_records(args.data, skip_bad_rows=args.skip_bad_rows, columns=columns, split=args.data_split,
                              config=args.data_config)
        records, kind, skipped, name = loaded.records, loaded.kind, loaded.skipped, args.data
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    preview = data_preview(records, tokenizer, template=args.template, max_seq_len=args.max_seq_len,
                           train_on_inputs=args.train_on_inputs, system=args.system)
    shown = [token_runs(e, tokenizer) for e in preview["examples"][:args.show]]
    counts = {**preview["counts"], "skipped": skipped}
    if args.json:
        print(json.dumps({"data": name, "format": kind, "model": args.model, "counts": counts,
                          "rows": [plain_text(r) for r in shown]}, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    color = console.is_terminal  # a terminal (or FORCE_COLOR): colours; a pipe or file: ⟦ ⟧ markers
    model = "the embedded SmolLM2-135M-Instruct" if args.model.lower() in ("default", "smollm2") else args.model
    console.print(f"{name}: {kind} rows, rendered with the tokenizer of {model} "
                  f"({'trained tokens in green' if color else 'trained tokens inside ⟦ ⟧'})", markup=False)
    for i, runs in enumerate(shown, 1):
        console.rule(f"example {i}", style="dim") if color else console.print(f"--- example {i}", markup=False)
        if color:
            console.print(Text.assemble(*[(t, "bold green" if trained else "dim") for t, trained in runs]))
        else:
            console.print(plain_text(runs), markup=False)
    console.print(counts_line(counts, args.max_seq_len) + (f", skipped {skipped}" if skipped else ""), markup=False)
    return 0
