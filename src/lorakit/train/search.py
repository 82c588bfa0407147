"""Automatic tuning with Optuna: which rank, alpha, learning rate, dropout and targets work for this model + data?

    base TrainOptions ──► for each trial: sample (r, alpha/r, lr, dropout, target set) ──► short training run
                          └─ every eval_every steps: held-out metric ──► trial.report ──► median pruner stops
                             runs whose metric is worse than the median of earlier runs at the same step
    study in SQLite (<out>/search.db) ──► results table, history / importance / intermediate PNGs, best.yaml

alpha is searched as alpha/r (`alpha_ratio`), the factor that sets the update scale, so that it does not
confound with r; best.yaml holds the resulting lora_alpha. One trial = one call of a runner
`runner(options, context, report) -> metric`; the default `train_trial` runs the recipe's stages
(lorakit.train.recipe.Recipe, with a PruningHook) on a base model loaded once and unloaded after each trial. Pass another runner to score
trials differently (tests use a tiny one).

Resuming: `--trials N` is the number of finished (complete or pruned) trials wanted, so rerunning the same
command after an interruption runs only the missing ones. A trial cut off by Ctrl-C (FAIL) or a kill (left
RUNNING) is retried once with the same parameters; this assumes one search process per study at a time.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lorakit.errors import ConfigError, DataError
from lorakit.train.evaluate import evaluate_accuracy, evaluate_loss
from lorakit.train.hooks import Hooks
from lorakit.train.options import TrainOptions, dump_yaml
from lorakit.train.prepare import RunData, load_data, prepare_data, prepare_model
from lorakit.train.recipe import Recipe
from lorakit.train.step import TrainingDiverged

METRICS = {"loss": "minimize", "accuracy": "maximize"}
DEFAULT_TARGET_SETS: dict[str, list[str] | str] = {
    "qv": ["q_proj", "v_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear": "all-linear",
}

Report = Callable[[int, float], None]


@dataclass
class SearchSpace:
    """What a trial may pick. lr is sampled log-uniformly in [lr_min, lr_max]; the rest are categorical."""

    ranks: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    alpha_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    lr_min: float = 1e-4
    lr_max: float = 3e-3
    dropouts: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1])
    target_sets: dict[str, list[str] | str] = field(default_factory=lambda: dict(DEFAULT_TARGET_SETS))

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"search space {name}: {why}")

        if not self.ranks or any(not isinstance(r, int) or r < 1 for r in self.ranks):
            bad("ranks", f"need positive integers, got {self.ranks}")
        if not self.alpha_ratios or any(a <= 0 for a in self.alpha_ratios):
            bad("alpha_ratios", f"need positive numbers, got {self.alpha_ratios}")
        if not 0 < self.lr_min <= self.lr_max:
            bad("lr", f"need 0 < min <= max, got {self.lr_min}:{self.lr_max}")
        if not self.dropouts or any(not 0 <= d < 1 for d in self.dropouts):
            bad("dropouts", f"need values in [0, 1), got {self.dropouts}")
        if not self.target_sets:
            bad("target_sets", "need at least one set of target modules")

    def suggest(self, trial) -> dict[str, Any]:
        """Returns the TrainOptions overrides trial `trial` samples (and records them as its params)."""
        r = trial.suggest_categorical("r", list(self.ranks))
        ratio = trial.suggest_categorical("alpha_ratio", list(self.alpha_ratios))
        lr = (trial.suggest_float("lr", self.lr_min, self.lr_max, log=True) if self.lr_max > self.lr_min
              else self.lr_min)
        dropout = trial.suggest_categorical("lora_dropout", list(self.dropouts))
        targets = trial.suggest_categorical("target_modules", list(self.target_sets))
        return overrides_for({"r": r, "alpha_ratio": ratio, "lr": lr, "lora_dropout": dropout,
                              "target_modules": targets}, self)


def overrides_for(params: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """Returns TrainOptions overrides for a trial's params (alpha_ratio -> lora_alpha, set name -> modules)."""
    out = {"r": int(params["r"]), "lora_alpha": float(params["alpha_ratio"]) * int(params["r"]),
           "lr": float(params.get("lr", space.lr_min)), "lora_dropout": float(params["lora_dropout"])}
    name = params["target_modules"]
    if name not in space.target_sets:
        raise ConfigError(f"target set {name!r} of a stored trial is not in this search space "
                          f"({', '.join(space.target_sets)}); pass the same --target-sets as before")
    out["target_modules"] = space.target_sets[name]
    return out


def parse_target_sets(items: list[str]) -> dict[str, list[str] | str]:
    """Returns {name: modules} from 'NAME=mod1+mod2', 'mod1+mod2', 'all-linear' or a known set name."""
    sets: dict[str, list[str] | str] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            name, spec = item, item
        if not sep and item in DEFAULT_TARGET_SETS:
            sets[name] = DEFAULT_TARGET_SETS[item]
        elif spec == "all-linear":
            sets[name] = "all-linear"
        else:
            modules = [m for m in spec.split("+") if m]
            if not modules:
                raise ConfigError(f"--target-sets: {item!r} names no module")
            sets[name] = modules
    return sets


# ---------------------------------------------------------------------------- one trial
@dataclass
class TrialContext:
    """What every trial shares: the base model (adapters removed after each trial) and the tokenized data."""

    model: Any
    tokenizer: Any
    data: RunData

    @property
    def eval_records(self) -> list[dict]:
        """Returns the held-out rows the trials are scored on."""
        return self.data.eval_records


def build_context(options: TrainOptions, log=print) -> TrialContext:
    """Returns the model and data for a search: the options' held-out split, or 10% of the training rows."""
    log(f"loading model {options.model} ...")
    model, tokenizer = prepare_model(options, log)
    records = load_data(options, tokenizer, log)
    train, held = list(records["train_records"]), list(records["eval_records"])
    if not held:  # a search scored on its own training rows would pick the most over-fitting config
        cut = max(1, len(train) // 10)
        if len(train) < 2:
            raise DataError("lorakit search needs held-out rows: pass --eval-data or at least 2 training rows")
        train, held = train[:-cut], train[-cut:]
        log(f"no held-out data given: holding out the last {cut} training rows for scoring")
    try:
        data = prepare_data(options, model, tokenizer, {**records, "train_records": train, "eval_records": held},
                            log)
    except DataError:
        data = None
    if data is None or not data.eval_examples:
        raise DataError("lorakit search: no training or held-out examples left after tokenization")
    return TrialContext(model, tokenizer, data)


def measure(o: TrainOptions, ctx: TrialContext, metric: str) -> float:
    """Returns the held-out metric of ctx.model now: mean token loss, or exact-match accuracy."""
    if metric == "accuracy":
        return float(evaluate_accuracy(ctx.model, ctx.tokenizer, ctx.data.eval_records, template=o.template,
                                       system=o.system, batch_size=o.eval_batch_size,
                                       max_new_tokens=o.max_new_tokens)["accuracy"])
    return float(evaluate_loss(ctx.model, ctx.data.eval_examples, o.eval_batch_size, ctx.data.pad_id))


class PruningHook(Hooks):
    """Reports the held-out metric at every eval to `report` and stops the run once the pruner says so."""

    def __init__(self, ctx: TrialContext, report: Report, metric: str) -> None:
        self.ctx, self.report, self.metric = ctx, report, metric
        self.value, self.pruned = float("nan"), None

    def on_eval(self, run, eval_loss: float) -> None:
        self.value = eval_loss if self.metric == "loss" else measure(run.o, self.ctx, self.metric)
        if run.step < run.n_steps:  # the final eval is the trial's value, not a report
            try:
                self.report(run.step, self.value)
            except Exception as e:  # optuna.TrialPruned: end the run after this step, re-raised by train_trial
                self.pruned = e

    def should_stop(self, run) -> bool:
        return self.pruned is not None


def train_trial(o: TrainOptions, ctx: TrialContext, report: Report, metric: str = "loss") -> float:
    """Returns the held-out metric after o.max_steps steps of LoRA training (nan if training diverged).

    The trial runs the recipe's stages (lorakit.train.recipe.Recipe) on the shared model and data, writing no
    files; a PruningHook calls report(step, metric) every o.eval_every steps and stops a pruned run (the
    pruner's exception is raised again here). The model gets its adapter back off afterwards, whatever happens.
    """
    import lorakit

    steps = o.max_steps or 1
    o = dataclasses.replace(o, max_steps=steps, warmup_steps=min(o.warmup_steps, steps // 2), nan_policy="stop",
                            accuracy=False, baseline_eval=False, progress=False, out=None, resume=None)
    hook = PruningHook(ctx, report, metric)
    recipe = Recipe(o, hooks=[hook], write_files=False, model=ctx.model, tokenizer=ctx.tokenizer, data=ctx.data,
                    log=lambda *a, **k: None)
    try:
        recipe.run()
    except TrainingDiverged:
        return float("nan")  # optuna records a nan objective as a failed trial
    finally:
        lorakit.unload(ctx.model)
    if hook.pruned is not None:
        raise hook.pruned
    return hook.value


# ---------------------------------------------------------------------------- the study
def open_study(storage: str, study_name: str, metric: str, seed: int, pruner_startup: int, pruner_warmup: int):
    """Returns the Optuna study in `storage` (created or loaded), with a TPE sampler and a median pruner."""
    import optuna

    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    pruner = optuna.pruners.MedianPruner(n_startup_trials=pruner_startup, n_warmup_steps=pruner_warmup)
    study = optuna.create_study(storage=storage, study_name=study_name, direction=METRICS[metric],
                                load_if_exists=True, pruner=pruner)
    if study.direction.name.lower() != METRICS[metric]:
        raise ConfigError(f"study {study_name!r} in {storage} was created to {study.direction.name.lower()} "
                          f"another metric; use --metric {'loss' if METRICS[metric] == 'maximize' else 'accuracy'} "
                          f"or a new --study-name")
    # Seed by history length: a resumed search must not replay the first run's random proposals.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    return study


def finished(study) -> list:
    """Returns the study's trials that count towards --trials: complete or pruned."""
    from optuna.trial import TrialState
    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def retry_interrupted(study, log=print) -> int:
    """Returns how many interrupted trials (Ctrl-C: FAIL, killed: RUNNING) were queued again with their params."""
    from optuna.trial import TrialState

    retried = {t.user_attrs.get("retry_of") for t in study.trials}
    n = 0
    for t in study.trials:
        stale = t.state == TrialState.RUNNING
        if stale:  # a process that was killed never closed it (one search process per study)
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if (stale or t.user_attrs.get("interrupted")) and t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
            n += 1
    if n:
        log(f"retrying {n} interrupted trial(s) with their parameters")
    return n


def run_search(base: TrainOptions, space: SearchSpace, out: str | Path, n_trials: int, *, storage: str | None = None,
               study_name: str = "lorakit-search", metric: str = "loss", trial_steps: int | None = None,
               eval_every: int | None = None, seed: int = 0, pruner_startup: int = 2, pruner_warmup: int = 0,
               timeout: float | None = None, runner: Callable | None = None, context: Any = None, log=print):
    """Returns the study after running trials until n_trials are finished (resuming what `storage` holds).

    storage defaults to sqlite:///<out>/search.db. Each trial trains for trial_steps (default
    base.max_steps) and reports the metric every eval_every steps (default: 4 reports per trial).
    `runner(options, context, report) -> value` replaces the default `train_trial`.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or f"sqlite:///{(out / 'search.db').resolve()}"
    study = open_study(storage, study_name, metric, seed, pruner_startup, pruner_warmup)
    _check_same_base(study, trial_base_dict(base), log)
    done = len(finished(study))
    if done >= n_trials:
        log(f"{done} trials are already finished in {storage}; nothing to run (raise --trials for more)")
        return study
    retry_interrupted(study, log)
    steps = trial_steps or base.max_steps or 20
    every = eval_every if eval_every is not None else max(1, steps // 4)
    trial_base = dataclasses.replace(base, max_steps=steps, eval_every=every, out=None, resume=None,
                                     progress=False, save_every=0, baseline_eval=False)
    if runner is None:
        context = context if context is not None else build_context(trial_base, log)
        _check_target_sets(context.model, space, trial_base)
        runner = lambda o, ctx, report: train_trial(o, ctx, report, metric)  # noqa: E731

    def objective(trial) -> float:
        options = dataclasses.replace(trial_base, **space.suggest(trial))
        options.validate()

        def report(step: int, value: float) -> None:
            trial.report(value, step)
            trial.set_user_attr("last_step", step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{metric} {value:.4g} at step {step} is worse than the median")

        try:
            value = runner(options, context, report)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        trial.set_user_attr("last_step", steps)
        log(f"trial {trial.number}: {metric} {value:.4g}  " + _params_text(trial.params))
        return value

    log(f"study {study_name!r} in {storage}: {done} trial(s) finished, running {n_trials - done} more")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's experimental-API and torch's scalar warnings per trial
        while len(finished(study)) < n_trials:
            before = len(study.trials)
            study.optimize(objective, n_trials=n_trials - len(finished(study)), timeout=timeout,
                           catch=(ConfigError, DataError))
            if timeout is not None or len(study.trials) == before:
                break
            if all(t.state.name == "FAIL" for t in study.trials[before:]):
                break  # every new trial failed: stop rather than loop on a broken setup
    return study


def trial_base_dict(base: TrainOptions) -> dict:
    """Returns the base options that define what a trial measures (JSON-able, without output paths)."""
    d = json.loads(json.dumps(base.to_dict(), default=str))
    for key in ("out", "resume", "progress", "max_steps", "eval_every", "save_every", "baseline_eval"):
        d.pop(key, None)
    return d


def _check_same_base(study, base: dict, log) -> None:
    # Trials of one study are only comparable on the same model, data and fixed options.
    stored = study.user_attrs.get("base_options")
    if stored is None:
        study.set_user_attr("base_options", base)
        return
    changed = sorted(k for k in set(stored) | set(base) if stored.get(k) != base.get(k))
    if changed:
        log(f"warning: this study's earlier trials ran with other base options ({', '.join(changed[:6])}); "
            f"their scores may not be comparable (use a new --study-name or --out to start afresh)")


def _check_target_sets(model, space: SearchSpace, options: TrainOptions) -> None:
    from lorakit.model.targets import find_targets

    for name, modules in space.target_sets.items():
        try:
            find_targets(model, dataclasses.replace(options, target_modules=modules).lora_config())
        except ConfigError as e:
            raise ConfigError(f"target set {name!r}: {e}") from None


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------- outputs
def trial_rows(study) -> list[dict]:
    """Returns one dict per trial: number, state, value, last_step, seconds and params (for tables and JSON)."""
    rows = []
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "last_step": t.user_attrs.get("last_step"), "seconds": seconds, "params": dict(t.params)})
    return rows


def best_options(study, base: TrainOptions, space: SearchSpace) -> TrainOptions:
    """Returns `base` with the best trial's r, lora_alpha, lr, lora_dropout and target_modules."""
    options = dataclasses.replace(base, out=None, resume=None, **overrides_for(study.best_trial.params, space))
    options.validate()
    return options


def write_best_yaml(study, base: TrainOptions, space: SearchSpace, path: str | Path, metric: str) -> Path:
    """Writes the best config as YAML for `lorakit train --config`; returns the path."""
    best = study.best_trial
    header = (f"# lorakit search: best of {len(finished(study))} trials (study {study.study_name!r}): trial "
              f"{best.number}, held-out {metric} {best.value:.6g}\n# {_params_text(best.params)}\n"
              f"# run it: lorakit train --config {Path(path).name}\n")
    p = Path(path)
    p.write_text(header + dump_yaml(best_options(study, base, space)), encoding="utf-8")
    return p


def save_plots(study, out: str | Path, log=print) -> list[Path]:
    """Writes Optuna's history, parameter-importance and intermediate-value plots as PNGs; returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    out = Path(out)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    plots = {"history.png": vis.plot_optimization_history, "intermediate.png": vis.plot_intermediate_values}
    if len(complete) >= 2 and len({json.dumps(t.params, sort_keys=True) for t in complete}) >= 2:
        plots["importances.png"] = vis.plot_param_importances
    else:
        log("parameter importances need at least 2 complete trials with different parameters; skipping that plot")
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances when every trial sampled the same value
                log(f"could not draw {name}: {e}")
                continue
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            written.append(out / name)
    return written


def results_table(study, metric: str):
    """Returns a rich Table of every trial, best first among the complete ones."""
    from rich.table import Table

    rows = trial_rows(study)
    sign = 1 if METRICS[metric] == "minimize" else -1
    order = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2, "RUNNING": 3, "WAITING": 4}
    rows.sort(key=lambda r: (order.get(r["state"], 5), sign * r["value"] if r["value"] is not None
                             and not math.isnan(r["value"]) else math.inf, r["number"]))
    best = study.best_trial.number if any(r["state"] == "COMPLETE" for r in rows) else None
    table = Table(title=f"lorakit search: {study.study_name} ({metric}, {METRICS[metric]})")
    for col in ("trial", "state", metric, "step", "r", "alpha", "lr", "dropout", "targets", "s"):
        table.add_column(col, justify="right" if col not in ("state", "targets") else "left")
    for r in rows:
        p = r["params"]
        alpha = p["r"] * p["alpha_ratio"] if "r" in p and "alpha_ratio" in p else None
        table.add_row(f"{r['number']}{' *' if r['number'] == best else ''}", r["state"],
                      "" if r["value"] is None else f"{r['value']:.4f}", str(r["last_step"] or ""),
                      str(p.get("r", "")), "" if alpha is None else f"{alpha:g}",
                      f"{p['lr']:.2e}" if "lr" in p else "", _fmt(p.get("lora_dropout", "")),
                      str(p.get("target_modules", "")), "" if r["seconds"] is None else f"{r['seconds']:.1f}")
    return table


def write_outputs(study, base: TrainOptions, space: SearchSpace, out: str | Path, metric: str, log=print) -> dict:
    """Writes trials.json, the plots and (when a trial completed) best.yaml; returns {what: path}."""
    out = Path(out)
    paths: dict[str, Path] = {}
    (out / "trials.json").write_text(json.dumps(trial_rows(study), indent=1, default=str) + "\n", encoding="utf-8")
    paths["trials"] = out / "trials.json"
    for p in save_plots(study, out, log):
        paths[p.stem] = p
    if any(t.state.name == "COMPLETE" for t in study.trials):
        paths["best"] = write_best_yaml(study, base, space, out / "best.yaml", metric)
    else:
        log("no trial completed: no best.yaml written")
    return paths
