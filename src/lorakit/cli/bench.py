"""`lorakit bench`: training-step speed and peak memory of lorakit vs PEFT vs full fine-tuning vs the floor.

    lorakit bench --small                                  quick check on a tiny model (about a minute)
    lorakit bench --out bench/results/run.json             the issue's 168M Llama config (several minutes)
    lorakit bench --modes lorakit,peft,floor --threads 2   a subset of modes

Runs bench/bench_train.py from the source checkout (it is a benchmark, not part of the installed package);
`lorakit bench --help` lists its options (the same as `python bench/bench_train.py --help`).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from lorakit.errors import ConfigError


def script_path() -> Path:
    """Returns the path of bench/bench_train.py in the source checkout lorakit runs from."""
    import lorakit
    return Path(lorakit.__file__).resolve().parents[2] / "bench" / "bench_train.py"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Returns the `bench` parser after registering it on `subparsers` (with the benchmark's own options)."""
    p = subparsers.add_parser(
        "bench", help="benchmark lorakit LoRA vs PEFT vs full fine-tuning vs the floor (step time, memory)",
        description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        bench = load_bench_script()
    except ConfigError as e:
        p.set_defaults(func=lambda args: _missing(e))
        return p
    bench.add_arguments(p)
    p.set_defaults(func=lambda args: bench.main(args=bench.finish(args, p)))
    return p


def _missing(error: ConfigError) -> int:
    raise error


def load_bench_script():
    """Returns bench/bench_train.py loaded as a module; raises ConfigError when the checkout lacks it."""
    path = script_path()
    if not path.is_file():
        raise ConfigError(f"the benchmark script {path} is missing: `lorakit bench` runs from a source "
                          "checkout of lorakit (git clone, then pip install -e .)")
    spec = importlib.util.spec_from_file_location("lorakit_bench_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
