"""`lorakit search`: tune rank, alpha, learning rate, dropout and target modules with Optuna.

    lorakit search --trials 20                                   the embedded model and data, study in runs/search
    lorakit search --config base.yaml --trials 30 --out runs/s1   base options from a `lorakit train` YAML
    lorakit search --model DIR --data train.jsonl --eval-data held.jsonl --ranks 4,8,16 --lr 1e-4:1e-3
    (the same command again, with --trials 40)                  resume: 40 finished trials in all

Every trial is a short training run (--trial-steps) scored on held-out loss (or --metric accuracy); a median
pruner stops trials that fall behind. The study lives in SQLite (--storage, default OUT/search.db), so the
same command resumes an interrupted search. Writes OUT/best.yaml (run it: lorakit train --config
OUT/best.yaml), OUT/history.png, OUT/importances.png, OUT/intermediate.png and OUT/trials.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from lorakit.errors import ConfigError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _lr_range(text: str) -> tuple[float, float]:
    lo, sep, hi = text.partition(":")
    try:
        return (float(lo), float(hi)) if sep else (float(lo), float(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX (or one value), got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Returns the `search` parser after registering it on `subparsers`."""
    p = subparsers.add_parser(
        "search", help="tune rank, alpha, lr, dropout and target modules with Optuna (resumable)",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="base training options, as for lorakit train")
    p.add_argument("--config", metavar="FILE.yaml", help="base training options (a `lorakit train` YAML)")
    p.add_argument("--model", help="base model (shortcut for model=...)")
    p.add_argument("--data", help="training data (shortcut for data=...)")
    p.add_argument("--eval-data", help="held-out data (default: the embedded split, or 10%% of --data)")
    p.add_argument("--out", type=Path, default=Path("runs/search"), help="output folder (default runs/search)")
    p.add_argument("--trials", type=int, default=20, help="finished trials wanted in all, resumed ones included "
                   "(default 20)")
    p.add_argument("--storage", default=None, help="SQLite file or database URL (default OUT/search.db)")
    p.add_argument("--study-name", default="lorakit-search", help="study name inside the storage")
    p.add_argument("--metric", choices=("loss", "accuracy"), default="loss",
                   help="held-out mean token loss (minimized) or exact-match accuracy (maximized)")
    p.add_argument("--trial-steps", type=int, default=None, help="optimizer steps per trial (default: max_steps)")
    p.add_argument("--eval-every", type=int, default=None, help="report the metric to the pruner every N steps "
                   "(default: 4 times per trial)")
    p.add_argument("--ranks", type=_ints, default=None, help="ranks to try (default 4,8,16,32)")
    p.add_argument("--alpha-ratios", type=_floats, default=None, help="alpha/r values to try (default 0.5,1,2,4)")
    p.add_argument("--lr", type=_lr_range, default=None, metavar="MIN:MAX",
                   help="learning-rate range, sampled log-uniformly (default 1e-4:3e-3)")
    p.add_argument("--dropouts", type=_floats, default=None, help="LoRA dropouts to try (default 0,0.05,0.1)")
    p.add_argument("--target-sets", default=None, metavar="SET,...",
                   help="target-module sets: qv, attention, all-linear, or NAME=mod1+mod2 "
                        "(default qv,attention,all-linear)")
    p.add_argument("--pruner-startup", type=int, default=2, help="trials finished before pruning starts (default 2)")
    p.add_argument("--pruner-warmup", type=int, default=0, help="steps within a trial before it may be pruned")
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.set_defaults(func=run)
    return p


def space_from_args(args: argparse.Namespace):
    """Returns the SearchSpace the flags describe (defaults for those not given)."""
    from lorakit.train.search import SearchSpace, parse_target_sets

    kw = {}
    if args.ranks is not None:
        kw["ranks"] = args.ranks
    if args.alpha_ratios is not None:
        kw["alpha_ratios"] = args.alpha_ratios
    if args.lr is not None:
        kw["lr_min"], kw["lr_max"] = args.lr
    if args.dropouts is not None:
        kw["dropouts"] = args.dropouts
    if args.target_sets is not None:
        kw["target_sets"] = parse_target_sets([s.strip() for s in args.target_sets.split(",") if s.strip()])
    return SearchSpace(**kw)


def base_options(args: argparse.Namespace):
    """Returns the base TrainOptions: --config < shortcuts (--model, --data, --eval-data) < key=value."""
    from lorakit.train.options import load_options, parse_override

    shortcuts = {k: v for k, v in (("model", args.model), ("data", args.data), ("eval_data", args.eval_data))
                 if v is not None}
    overrides = dict(parse_override(o) for o in args.overrides)
    return load_options(args.config, {**shortcuts, **overrides})


def storage_url(storage: str | None, out: Path) -> str:
    """Returns an SQLAlchemy URL: `storage` if it is one, else sqlite:/// of the file (default OUT/search.db)."""
    if storage and "://" in storage:
        return storage
    path = Path(storage) if storage else out / "search.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path.resolve()}"


def run(args: argparse.Namespace) -> int:
    """Runs the search, prints the table and writes the files; returns the exit status."""
    from rich.console import Console

    from lorakit.train.search import results_table, run_search, write_outputs

    if args.trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {args.trials}")
    console = Console()
    log = console.print
    base = base_options(args)
    space = space_from_args(args)
    study = run_search(base, space, args.out, args.trials, storage=storage_url(args.storage, args.out),
                       study_name=args.study_name, metric=args.metric, trial_steps=args.trial_steps,
                       eval_every=args.eval_every, seed=args.seed, pruner_startup=args.pruner_startup,
                       pruner_warmup=args.pruner_warmup, timeout=args.timeout, log=log)
    if not study.trials:
        log("no trials ran")
        return 1
    console.print(results_table(study, args.metric))
    paths = write_outputs(study, base, space, args.out, args.metric, log)
    for what, path in paths.items():
        log(f"{what}: {path}")
    if "best" in paths:
        log(f"train the best config: lorakit train --config {paths['best']}")
        return 0
    return 1
