"""The LoRA fine-tuning recipe, top to bottom: what `lorakit train` runs.

    load model -> device -> (quantize) -> data -> baseline accuracy -> inject LoRA -> (adaptive rank)
    -> optimizer + schedule -> (resume) -> steps [progress bar, metrics, eval, checkpoints, NaN and signal checks]
    -> (adaptive rank: finalize to per-module ranks) -> final eval + accuracy
    -> adapter, metrics.jsonl, plot.png, config.yaml, README.md

Only rank 0 (see loop.dist_env) prints and writes files, so the same recipe can run under torchrun.
"""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from lorakit.errors import ConfigError, DataError
from lorakit.train.checkpoint import find_latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from lorakit.train.loop import (DataPosition, StopRequest, TrainingDiverged, build_optimizer, build_scheduler,
                                dist_env, enable_gradient_checkpointing, evaluate_accuracy, evaluate_loss,
                                iterate_batches, model_device, resolve_device, seed_everything, total_steps, train_step)
from lorakit.train.options import TrainOptions, dump_yaml, load_options
from lorakit.train.report import MetricsLog, plot_metrics, write_readme

RUNS = Path("runs")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


def default_out_dir() -> Path:
    """Returns runs/<YYYYmmdd-HHMMSS> (with a suffix if that exists)."""
    base = RUNS / time.strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def resolve_resume(resume: str | None, out: str | None, log=print) -> tuple[Path | None, Path | None]:
    """Returns (output folder, checkpoint folder) for --resume: 'latest', a run folder, or a checkpoint folder."""
    if not resume:
        return (Path(out) if out else None), None
    if resume == "latest":
        run = Path(out) if out else None
        if run is None:
            runs = sorted((p for p in RUNS.glob("*") if (p / "checkpoints").is_dir()), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise ConfigError("--resume: no run with checkpoints in runs/; pass --out FOLDER of the run to resume")
            run = runs[-1]
    else:
        run = Path(resume)
        if not run.exists():
            raise ConfigError(f"--resume: {run} does not exist")
        if (run / "state.json").exists() or (run / "complete").exists():  # a checkpoint folder itself
            return run.parent.parent, run
    ckpt = find_latest_checkpoint(run, log)
    if ckpt is None:
        raise ConfigError(f"--resume: no complete checkpoint in {run / 'checkpoints'}")
    return run, ckpt


def load_data(o: TrainOptions, tokenizer, log=print) -> dict:
    """Returns {train_records, eval_records, data_name, skipped} for the options (embedded default or files)."""
    from lorakit.train.data import embedded_dataset, load_records

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
        held = _spread(held, o.eval_limit)
    return {"train_records": train, "eval_records": held, "data_name": name, "skipped": skipped}


def _spread(records: list[dict], n: int) -> list[dict]:
    """Returns n records taken round-robin over their 'task' column, so a limited eval still covers every task."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r.get("task", ""), []).append(r)
    out, i = [], 0
    while len(out) < min(n, len(records)):
        out += [rows[i] for rows in by_task.values() if i < len(rows)][: n - len(out)]
        i += 1
    return out


def prepare_model(o: TrainOptions, log=print):
    """Returns (model, tokenizer) loaded for the options, on o.device, quantized when quantize=nf4."""
    from lorakit.models import load_model

    model, tokenizer = load_model(o.model, trust_remote_code=o.trust_remote_code)
    model.to(resolve_device(o.device))  # before quantizing: bitsandbytes quantizes on the weight's device
    if o.quantize == "nf4":
        from lorakit.quant import quantize  # optional: needs bitsandbytes
        n_params = sum(p.numel() for p in model.parameters())
        model = quantize(model) or model
        if n_params < SMALL_MODEL_PARAMS:
            log(f"note: round-to-nearest NF4 costs small models a lot ({n_params / 1e6:.0f}M parameters here; the "
                f"embedded SmolLM2-135M drops from 30.9% to 2.9% before training); --quantize nf4-gptq keeps the "
                f"same 4-bit format with far less damage (27.9%)")
    return model, tokenizer


SMALL_MODEL_PARAMS = 1_000_000_000  # below this, plain NF4 rounding measurably hurts (README, QLoRA)


def tokenize_training(o: TrainOptions, records, tokenizer):
    """Returns (examples, stats) for the training rows, tokenized as the options say."""
    from lorakit.train.data import tokenize_records
    return tokenize_records(records, tokenizer, template=o.template, max_seq_len=o.max_seq_len,
                            train_on_inputs=o.train_on_inputs, system=o.system)


def calibration_inputs(examples: list[dict], n: int) -> list[torch.Tensor]:
    """Returns the token ids of the first n training examples (one (1, T) tensor each): GPTQ's calibration."""
    return [torch.tensor(e["input_ids"])[None] for e in examples[:n]]


def quantize_gptq(model, calibration: list[torch.Tensor], log=print) -> None:
    """Quantizes `model` to NF4 in place with GPTQ rounding on `calibration` (lorakit.quant.quantize)."""
    from lorakit.quant import quantize
    device = model_device(model)
    t0 = time.time()
    log(f"quantizing the base to NF4 with GPTQ rounding on {len(calibration)} calibration rows ...")
    quantize(model, calibration=[c.to(device) for c in calibration])
    log(f"quantized in {time.time() - t0:.0f} s")


def train(o: TrainOptions, command: str | None = None, console=None) -> dict:
    """Runs the whole recipe for `o`; returns the results dict (also written to out/results.json)."""
    import lorakit
    from lorakit.train.data import pack_examples, tokenize_records

    t_start = time.time()
    rank, world = dist_env()
    main = rank == 0
    say = (console.print if console is not None else print) if main else (lambda *a, **k: None)
    out, ckpt = resolve_resume(o.resume, o.out, say)
    out = out or default_out_dir()
    o.out = str(out)
    seed_everything(o.seed)

    # -- model and data
    say(f"loading model {o.model} ...")
    model, tokenizer = prepare_model(o, say)
    data = load_data(o, tokenizer, say)
    train_ex, stats = tokenize_training(o, data["train_records"], tokenizer)
    if not train_ex:
        raise DataError(f"{data['data_name']}: no training examples left after tokenization "
                        f"({stats['dropped']} rows lost their whole response to max_seq_len={o.max_seq_len})")
    if o.quantize == "nf4-gptq":
        quantize_gptq(model, calibration_inputs(train_ex, o.quant_calibration), say)
    if stats["truncated"] or stats["dropped"]:
        say(f"{stats['truncated']} of {stats['rows']} rows were longer than max_seq_len={o.max_seq_len} and were "
            f"truncated ({stats['dropped']} dropped: nothing of the response was left)")
    if o.packing:
        train_ex = pack_examples(train_ex, o.max_seq_len)
    eval_ex, _ = tokenize_records(data["eval_records"], tokenizer, template=o.template, max_seq_len=o.max_seq_len,
                                  system=o.system)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Only now, with model and data loaded, does the run get a folder: a bad input leaves nothing behind and
    # never overwrites the config.yaml an earlier run (and its --resume) depends on.
    if main and ckpt is None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_yaml(o), encoding="utf-8")
    n_steps = total_steps(len(train_ex), o.batch_size, o.grad_accum, o.max_steps, o.epochs, world)
    do_acc = o.accuracy and bool(data["eval_records"])
    acc_args = dict(template=o.template, system=o.system, batch_size=o.eval_batch_size, max_new_tokens=o.max_new_tokens)
    metrics = MetricsLog(out, enabled=main)
    results = {"options": o.to_dict(), "command": command or "lorakit train", "world_size": world,
               "model_name": getattr(model.config, "_name_or_path", o.model),
               "model_parameters": sum(p.numel() for p in model.parameters()),
               "data_name": data["data_name"], "train_examples": len(train_ex), "truncated": stats["truncated"],
               "skipped_rows": data["skipped"], "eval_rows": len(data["eval_records"]), "steps": n_steps}

    # -- baseline (skipped on resume: the first run measured it)
    before = None
    if do_acc and o.baseline_eval and ckpt is None:
        say(f"measuring the un-tuned model's accuracy on {len(data['eval_records'])} held-out rows ...")
        before = evaluate_accuracy(model, tokenizer, data["eval_records"], **acc_args)
        metrics.write({"step": 0, "accuracy": before["accuracy"], "per_task": before["per_task"], "phase": "before"})
        say(f"before training: accuracy {100 * before['accuracy']:.1f}%")

    # -- LoRA, optimizer, schedule
    torch.manual_seed(o.seed)  # LoRA init independent of whatever ran before
    lorakit.inject(model, o.lora_config())
    if o.gradient_checkpointing:
        enable_gradient_checkpointing(model, offload=o.offload_activations)
    controller = None
    if o.adaptive_rank:  # before the optimizer: it swaps the A factors for P·diag(λ)·Q triplets
        from lorakit.adaptive import enable_adaptive_rank
        warmup, final = o.adaptive_phases(n_steps)
        controller = enable_adaptive_rank(model, None, o.adaptive_target(), n_steps, warmup, final,
                                          orth_reg=o.adaptive_orth_reg, interval=o.adaptive_interval, seed=o.seed)
        say(f"adaptive rank: r={o.r} -> an average of {o.adaptive_target()} over {len(controller.layers)} modules "
            f"(budget {controller.init_budget} -> {controller.target_budget}; warmup {warmup}, final {final} steps)")
    if o.compile:
        from lorakit.compiling import compile_blocks
        # dynamic shapes from the start: padded batches change length every step (one compile, not two)
        n_blocks = compile_blocks(model, dynamic=None if o.packing else True)
        say(f"torch.compile: {n_blocks} blocks share one compiled training graph (compiled during the first step)")
    trainable, total = lorakit.trainable_parameters(model)
    results["trainable_parameters"] = trainable
    say(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%); "
        f"{len(train_ex)} examples, {n_steps} steps of {o.batch_size} x {o.grad_accum} x {world}")
    optimizer = build_optimizer(model, o.lr, o.weight_decay, o.lora_plus_ratio, o.adam_betas)
    from lorakit.quant import format_memory_report, memory_report
    results["memory"] = memory_report(model, optimizer)  # AdamW's two moments counted before its first step
    say("memory (weights, gradients and optimizer state; activations come on top):\n"
        + format_memory_report(results["memory"]))
    scheduler = build_scheduler(optimizer, o.warmup_steps, n_steps, o.min_lr_ratio)
    if controller is not None:
        scheduler = _WithAdaptive(scheduler, controller, model_device(model))
    position, step, tokens_seen = DataPosition(), 0, 0
    if ckpt is not None:
        state, position = load_checkpoint(ckpt, model, optimizer, scheduler)
        if main:  # the checkpoint fits these options: from now on they are the run's
            (out / "config.yaml").write_text(dump_yaml(o), encoding="utf-8")
        step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
        before = state.get("accuracy_before")
        metrics.truncate_after(step)
        say(f"resumed from {ckpt} at step {step}")

    # -- distributed (lorakit.train.distributed): DDP / FSDP2 / as-is; `model` stays plain for eval and saving
    from lorakit.train.distributed import agree_stop, wrap_for_distributed
    train_model = wrap_for_distributed(model, o.strategy, o.batch_size, o.grad_accum, log=say)

    # -- the loop
    batches = iterate_batches(train_ex, o.batch_size, o.seed, position, pad_id, rank, world,
                              group_by_length=o.group_by_length, padding_free=o.padding_free)
    last_loss, eval_loss, stopped = float("nan"), float("nan"), None
    eval_loss_step = None  # the step eval_loss was measured at (the end, or the last eval_every)
    ckpt_state = lambda: {"tokens_seen": tokens_seen, "accuracy_before": before, "world_size": world}  # noqa: E731
    t_train = time.time()
    with StopRequest() as stop, _progress(main and o.progress, n_steps, step, console) as bar:
        while step < n_steps:
            t0 = time.time()
            adaptive = {} if controller is None else dict(
                extra_loss=controller.penalty, after_update=lambda s=step: controller.step(model, s))
            result = train_step(train_model, [next(batches) for _ in range(o.grad_accum)], optimizer, scheduler,
                                o.max_grad_norm, **adaptive)
            stop.signum = agree_stop(stop.signum)  # distributed: every rank stops after the same step
            step += 1
            if not result.finite:
                if o.nan_policy == "stop":
                    last = find_latest_checkpoint(out, lambda m: None)
                    raise TrainingDiverged(
                        f"non-finite loss at step {step}: {result.bad} went NaN/Inf first. "
                        + (f"The last good checkpoint is {last}; resume from it with a lower --lr "
                           f"(or set nan_policy=skip)." if last else "No checkpoint was written before it; "
                           "lower --lr, or set nan_policy=skip to skip such steps."))
                say(f"step {step}: non-finite loss ({result.bad}); update skipped (nan_policy=skip)")
            else:
                last_loss = result.loss
            tokens_seen += result.input_tokens
            tps = result.input_tokens / max(time.time() - t0, 1e-9)
            lr = scheduler.get_last_lr()[0]
            if step % o.log_every == 0 or step == n_steps:
                metrics.write({"step": step, "loss": result.loss, "lr": lr, "tokens_per_s": round(tps, 1),
                               "grad_norm": result.grad_norm, "epoch": position.epoch, "tokens_seen": tokens_seen,
                               "finite": result.finite,
                               **({"rank_budget": controller.budget} if controller is not None else {})})
            bar(step, result.loss, lr, tps)
            if o.eval_every and step % o.eval_every == 0 and eval_ex and step < n_steps:
                eval_loss, eval_loss_step = evaluate_loss(model, eval_ex, o.eval_batch_size, pad_id), step
                metrics.write({"step": step, "eval_loss": eval_loss})
            if main and ((o.save_every and step % o.save_every == 0 and step < n_steps) or stop.signum):
                save_checkpoint(out, step, model, optimizer, scheduler, position, ckpt_state())
                prune_checkpoints(out, o.keep_checkpoints)
            if stop.signum:
                stopped = f"{stop.name} at step {step}"
                break
    results["train_seconds"] = time.time() - t_train
    results["final_loss"] = last_loss

    # -- the end: final eval, accuracy, files
    if stopped:
        results.update(stopped=stopped, exit_code=EXIT_CODES.get(stop.name, 1), steps_done=step)
        say(f"stopped by {stopped}; checkpoint written to {out / 'checkpoints'}. "
            f"Continue with: lorakit train --out {out} --resume")
    else:
        if main:
            save_checkpoint(out, step, model, optimizer, scheduler, position, ckpt_state())
            prune_checkpoints(out, o.keep_checkpoints)
        if controller is not None:
            # after the last checkpoint (it keeps the triplet form a resume needs); exact: pruned λ are zero
            ranks = controller.finalize(model)
            results["adaptive_ranks"] = ranks
            say(f"adaptive rank: {sum(ranks.values())} = budget {controller.target_budget} over {len(ranks)} "
                f"modules, ranks {min(ranks.values())}..{max(ranks.values())}")
        after = None
        if do_acc:  # the run's measured result; its held-out loss comes from the same forward
            say("measuring held-out accuracy after training ...")
            after = evaluate_accuracy(model, tokenizer, data["eval_records"], **acc_args, with_loss=bool(eval_ex),
                                      max_seq_len=o.max_seq_len)
            if eval_ex:
                eval_loss, eval_loss_step = after.pop("loss"), step
                after.pop("target_tokens")
                metrics.write({"step": step, "eval_loss": eval_loss})
            metrics.write({"step": step, "accuracy": after["accuracy"], "per_task": after["per_task"],
                           "phase": "after"})
        elif eval_ex and (o.final_eval_loss if o.final_eval_loss is not None else True):  # asked, or the result
            eval_loss, eval_loss_step = evaluate_loss(model, eval_ex, o.eval_batch_size, pad_id), step
            metrics.write({"step": step, "eval_loss": eval_loss})
        results.update(accuracy_before=before, accuracy_after=after, exit_code=0, steps_done=step)
        if main:
            lorakit.save_adapter(model, out / "adapter")
    results["eval_loss"], results["eval_loss_step"] = eval_loss, eval_loss_step
    results["total_seconds"] = time.time() - t_start
    results["out"] = str(out)
    if main:
        plot_metrics(out)
        write_readme(out, results)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    results["model"], results["tokenizer"] = model, tokenizer
    return results


class _WithAdaptive:
    """The LR scheduler plus the adaptive-rank controller, so that checkpoints carry both in scheduler.pt.

    Why: a resumed adaptive run needs the controller's importance statistics and masks of the same step.
    The triplet factors themselves are trainable parameters and land in trainable.safetensors as they are.
    """

    def __init__(self, scheduler, controller, device: torch.device) -> None:
        self.scheduler, self.controller, self.device = scheduler, controller, device

    def step(self) -> None:
        self.scheduler.step()

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def state_dict(self) -> dict:
        """Returns {"scheduler": ..., "adaptive": ...} with the controller's tensors on the CPU."""
        return {"scheduler": self.scheduler.state_dict(), "adaptive": _tensors_to(self.controller.state_dict(), "cpu")}

    def load_state_dict(self, state: dict) -> None:
        """Restores both; KeyError for a checkpoint of a run without adaptive rank."""
        if "adaptive" not in state:
            raise KeyError("no adaptive-rank state: the checkpoint is from a run without --adaptive-rank")
        self.scheduler.load_state_dict(state["scheduler"])
        adaptive = dict(state["adaptive"])  # statistics live with the factors; the masks stay on the CPU
        adaptive["ipt"], adaptive["unc"] = _tensors_to(adaptive["ipt"], self.device), _tensors_to(adaptive["unc"],
                                                                                                  self.device)
        self.controller.load_state_dict(adaptive)


def _tensors_to(obj, device):
    """Returns nested dicts with every tensor moved to `device`."""
    if isinstance(obj, dict):
        return {k: _tensors_to(v, device) for k, v in obj.items()}
    return obj.to(device) if isinstance(obj, torch.Tensor) else obj


class _progress:
    """A rich progress bar (loss, lr, tokens/s, ETA) as a context manager; calling it updates the bar."""

    def __init__(self, enabled: bool, total: int, start: int, console=None) -> None:
        self.enabled, self.total, self.start, self.console = enabled, total, start, console

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.p = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                              TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TextColumn("ETA"),
                              TimeRemainingColumn(), console=self.console, transient=False)
            self.p.__enter__()
            self.task = self.p.add_task("train", total=self.total, completed=self.start, loss="-", lr="-", tps="-")
        return self

    def __call__(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self.enabled:
            self.p.update(self.task, completed=step, loss=f"{loss:.4f}" if math.isfinite(loss) else "nan",
                          lr=f"{lr:.2e}", tps=f"{tps:,.0f}")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.p.__exit__(*exc)


def command_line(o: TrainOptions) -> str:
    """Returns a `lorakit train key=value ...` command that reproduces the options (non-defaults only)."""
    default = TrainOptions().to_dict()
    parts = [f"{k}={v if isinstance(v, (int, float, str)) else json.dumps(v)}"
             for k, v in o.to_dict().items() if v != default[k] and k not in ("resume",)]
    return "lorakit train " + " ".join(shlex.quote(p) for p in parts)


def load_for_inference(model_spec: str | None, adapter: str | None, template: str | None = None,
                       system: str | None = None, device: str = "auto", trust_remote_code: bool = False,
                       quantize: str | None = None):
    """Returns (model, tokenizer, template, system) with the adapter loaded; template/system default to the run's.

    An adapter written by `lorakit train` sits in a run folder whose config.yaml names the template, system
    prompt and quantization it was trained with; generation and evaluation use the same unless told otherwise
    (quantize: "nf4" or "none"; None = the run's setting, else none).
    """
    if quantize not in (None, "none", "nf4", "nf4-gptq"):
        raise ConfigError(f"--quantize {quantize!r}: choose none, nf4 or nf4-gptq")
    import lorakit
    from lorakit.models import load_model
    from lorakit.train.options import read_config_file

    run_cfg = {}
    if adapter and (Path(adapter) / "state.json").is_file():  # a checkpoint folder: use its adapter/
        adapter = str(Path(adapter) / "adapter")
    if adapter:
        # out/adapter or out/checkpoints/step-N/adapter: the run's config.yaml is 1 or 3 levels up
        for run_dir in (Path(adapter).parent, Path(adapter).parent.parent.parent):
            if (run_dir / "config.yaml").is_file():
                try:
                    run_cfg = read_config_file(run_dir / "config.yaml")
                except ConfigError:
                    pass
                break
    model, tokenizer = load_model(model_spec or run_cfg.get("model") or "default", trust_remote_code=trust_remote_code)
    model.to(resolve_device(device))
    how = quantize or run_cfg.get("quantize")
    if how == "nf4":
        from lorakit.quant import quantize as quantize_model
        model = quantize_model(model) or model
    elif how == "nf4-gptq":  # the same base the adapter trained on: GPTQ on the run's own calibration rows
        o = load_options(base={k: v for k, v in run_cfg.items() if k != "resume"})
        train_ex, _ = tokenize_training(o, load_data(o, tokenizer, lambda *a, **k: None)["train_records"], tokenizer)
        if not train_ex:
            raise ConfigError("--quantize nf4-gptq needs the run's training data for calibration; none was found")
        quantize_gptq(model, calibration_inputs(train_ex, o.quant_calibration),
                      log=lambda msg: print(msg, file=sys.stderr))  # stdout may be --json
    if adapter:
        lorakit.load_adapter(model, adapter)
    model.eval()
    return model, tokenizer, template or run_cfg.get("template", "auto"), system or run_cfg.get("system")
