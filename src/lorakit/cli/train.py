"""`lorakit train`: LoRA fine-tuning from flags, a YAML config and key=value overrides.

    lorakit train                                   the default run: embedded SmolLM2-135M + instruction data
    lorakit train --model DIR --data train.jsonl --eval-data held.jsonl --out runs/mine --max-steps 500
    lorakit train --config run.yaml lr=1e-4 r=16    YAML file, then flags, then key=value overrides win
    lorakit train --out runs/mine --resume          continue from the newest complete checkpoint

Every field of lorakit.train.options.TrainOptions is a flag (`--max-seq-len`, `--lora-alpha`, ...) and a
`key=value` override, documented with its default in `lorakit train --help`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorakit.train.options import TrainOptions, coerce, load_options, option_fields, read_config_file

_BOOL = "bool"


def _is_bool(f) -> bool:
    return f.type in (bool, "bool", "bool | None")  # bool | None: unset means "lorakit decides"


class _IntermixedParser(argparse.ArgumentParser):
    """Parses `key=value` overrides wherever they appear among the flags (plain argparse takes one run of them)."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers `train` and returns its parser."""
    p = subparsers.add_parser(
        "train", help="fine-tune a model with LoRA (no arguments: the embedded default run)",
        description=__doc__.split("\n\n")[0] + " With no arguments: fine-tune the embedded SmolLM2-135M-Instruct "
        "on the embedded instruction dataset, print the held-out accuracy before and after, and write the "
        "adapter, metrics.jsonl, plot.png, config.yaml and README.md to runs/<timestamp>.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < --config FILE.yaml < flags < key=value overrides. Lists take commas "
               "(--target-modules q_proj,v_proj), mappings take YAML (rank_pattern='{q_proj: 4}'), 'none' clears "
               "an optional value. SIGINT/SIGTERM write a checkpoint and exit (status 130/143).")
    p.__class__ = _IntermixedParser  # the top-level CLI builds plain parsers; this one needs intermixed parsing
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file with any of the options below (yaml.safe_load)")
    p.add_argument("--nproc", type=int, default=None, metavar="N", help="train on N processes of this machine: "
                   "relaunches itself under torchrun (see docs/distributed.md)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides, e.g. lr=1e-4 r=16")
    defaults = TrainOptions()
    for f in option_fields():
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = "auto" if default is None and _is_bool(f) else default
        help_text = f"{f.metadata.get('help', '')} (default: {shown})".replace("%", "%%")  # argparse formats help
        if f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", default=None, metavar="PATH", help=help_text)
        elif _is_bool(f):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, default=None, metavar=f.name.upper(), help=help_text)
    p.set_defaults(func=run)
    return p


def _run_config(resume: str | None, out: str | None) -> Path | None:
    """Returns the config.yaml of the run a --resume refers to, when there is one."""
    from lorakit.train.recipe import resolve_resume

    if not resume:
        return None
    run_dir, _ = resolve_resume(resume, out, log=lambda m: None)
    return run_dir / "config.yaml" if run_dir and (run_dir / "config.yaml").is_file() else None


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """Returns TrainOptions from parsed args: (the resumed run's config.yaml) < --config < flags < overrides."""
    flags = {f.name: getattr(args, f.name) for f in option_fields() if getattr(args, f.name, None) is not None}
    flags = {k: coerce(k, v) for k, v in flags.items()}
    values: dict = {}
    if not args.config:
        previous = _run_config(flags.get("resume"), flags.get("out"))
        if previous is not None:
            values = {k: v for k, v in read_config_file(previous).items() if k != "resume"}
    else:
        values = read_config_file(args.config)
    values.update(flags)
    options = load_options(None, args.overrides, base=values)
    return options


def run(args: argparse.Namespace) -> int:
    """Runs `lorakit train`; returns the exit status."""
    from rich.console import Console

    from lorakit.train.recipe import command_line, train
    from lorakit.train.report import accuracy_table_rich

    options = options_from_args(args)
    if (getattr(args, "nproc", None) or 1) > 1:  # distributed: relaunch under torchrun (lorakit.train.distributed)
        from lorakit.train.distributed import launch_local
        return launch_local(args.nproc, options)
    from lorakit.train.runtime import is_main_process
    # under torchrun only rank 0 prints; in a log file (not a terminal) lines are not cut at 80 columns
    console = Console(stderr=False, quiet=not is_main_process(), soft_wrap=not sys.stdout.isatty())
    results = train(options, command=command_line(options), console=console)
    if results.get("accuracy_before") or results.get("accuracy_after"):
        console.print(accuracy_table_rich(results.get("accuracy_before"), results.get("accuracy_after")))
    if results.get("exit_code", 0) == 0:
        console.print(f"done in {results['total_seconds']:.0f} s: adapter in {Path(results['out']) / 'adapter'}, "
                      f"report in {Path(results['out']) / 'README.md'}")
    sys.stdout.flush()
    return int(results.get("exit_code", 0))
