"""The LoRA fine-tuning recipe: what `lorakit train` runs, as stages a reader follows top to bottom.

    Recipe.run():
      setup_run        output folder (--resume), seeds
      setup_data       tokenizer -> read rows -> tokenize -> (pack)      skipped when data is handed in; before
                       the model, so a bad row fails in seconds, not after an 8B load (the tokenizer alone)
      setup_model      load model -> device -> (nf4 | GPTQ on the data)  skipped when a model is handed in
      measure_baseline held-out accuracy of the un-tuned model
      setup_lora       inject LoRA -> (gradient checkpointing, adaptive rank, compile)
      setup_optimizer  optimizer_fn -> schedule -> (resume from a checkpoint) -> DDP/FSDP wrapper
      run_steps        step_fn per step ──► hooks.on_step_end ──► (eval ──► hooks.on_eval) ──► checkpoints
                       stops at n_steps, on SIGINT/SIGTERM, or when a hook's should_stop says so
      finish           (adaptive: final ranks) -> final eval -> accuracy -> adapter, metrics, plot, README

metrics.jsonl's records also go to the --report-to trackers (lorakit.train.trackers); on a terminal the
progress is a bar, in a log a plain line every progress_every steps (lorakit.train.progress).

Hooks (lorakit.train.hooks.Hooks) watch or stop a run; `step_fn` and `optimizer_fn` replace the training
step and the optimizer builder (bench, search). Only rank 0 (see runtime.dist_env) prints and writes files,
so the same recipe can run under torchrun.
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

import lorakit
from lorakit.errors import ConfigError, DataError  # noqa: F401  (re-exported: old import path)
from lorakit.model.quantize import is_quantized
from lorakit.train.batching import DataPosition, iterate_batches, resolve_padding_free, total_steps
from lorakit.train.checkpoint import (find_latest_checkpoint, load_checkpoint, prune_checkpoints,  # noqa: F401
                                      resolve_resume, save_checkpoint)
from lorakit.train.distributed import agree_stop, wrap_for_distributed
from lorakit.train.evaluate import evaluate_accuracy, evaluate_loss
from lorakit.train.hooks import Hooks
from lorakit.train.inference import load_for_inference  # noqa: F401  (re-exported: old import path)
from lorakit.train.optim import SchedulerWithAdaptive, build_optimizer, build_scheduler
from lorakit.train.options import TrainOptions, dump_yaml
from lorakit.train.prepare import (SMALL_MODEL_PARAMS, RunData, calibration_inputs, load_data,  # noqa: F401
                                   prepare_data, prepare_model, quantize_gptq, tokenize_training)
from lorakit.train.progress import PlainProgress, ProgressBar, is_terminal, quiet_third_party_progress
from lorakit.train.trackers import TrackedMetrics, Trackers, resolve_report_to
from lorakit.train.report import MetricsLog, plot_metrics, write_readme
from lorakit.train.runtime import RUNS, StopRequest, default_out_dir, dist_env, model_device  # noqa: F401
from lorakit.train.runtime import seed_everything
from lorakit.train.step import TrainingDiverged, train_step

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Recipe:
    """One training run; its stages share state as attributes (model, data, optimizer, step, results ...)."""

    def __init__(self, o: TrainOptions, command: str | None = None, console=None, hooks: Sequence[Hooks] = (), *,
                 step_fn: Callable | None = None, optimizer_fn: Callable | None = None, write_files: bool = True,
                 model=None, tokenizer=None, data: RunData | None = None, log: Callable | None = None) -> None:
        self.o, self.command, self.console, self.hooks = o, command, console, list(hooks)
        # looked up here, not bound as defaults, so that a test may still patch recipe.train_step
        self.step_fn, self.optimizer_fn = step_fn or train_step, optimizer_fn or build_optimizer
        self.write_files = write_files
        self.model, self.tokenizer, self.data = model, tokenizer, data
        self.rank, self.world = dist_env()
        self.main = self.rank == 0
        self.writes = self.main and write_files
        if log is None:
            log = console.print if console is not None else print
        self.say = log if self.main else (lambda *a, **k: None)
        self.step, self.tokens_seen, self.position = 0, 0, DataPosition()
        self.controller, self.ckpt, self.before = None, None, None
        self.last_loss, self.eval_loss, self.eval_step = float("nan"), float("nan"), None
        self.stopped, self.stop_signal, self.step_seconds = None, None, 0.0

    def run(self) -> dict:
        """Runs every stage; returns the results dict (also written to out/results.json)."""
        self.setup_run()
        new_data = self.data is None
        if new_data:
            self.setup_data()
        if self.model is None:
            self.setup_model()
        if new_data:
            self.make_run_folder()
        self.describe()
        self.measure_baseline()
        self.setup_lora()
        self.setup_optimizer()
        self.run_steps()
        return self.finish()

    # ------------------------------------------------------------------------------------------ set up
    def setup_run(self) -> None:
        """Picks the output folder (and the checkpoint to resume from) and seeds every generator."""
        o = self.o
        self.t_start = time.time()
        out, self.ckpt = resolve_resume(o.resume, o.out, self.say)
        self.out = out or default_out_dir()
        o.out = str(self.out)
        seed_everything(o.seed)
        quiet_third_party_progress()  # in a log: no third-party progress bars
        self.report_to = resolve_report_to(o.report_to)  # a missing tracker package fails before anything loads

    def setup_model(self) -> None:
        """Loads (and maybe quantizes) the base model and its tokenizer; GPTQ calibrates on the data's rows."""
        d = self.data
        self.say(f"data: {d.stats.get('rows', len(d.train_records))} training rows ({len(d.train_examples)} "
                 f"examples), {len(d.eval_records)} held-out rows; loading model {self.o.model} ...")
        self.model, self.tokenizer = prepare_model(self.o, self.say, d.calibration)
        if self.o.quantize == "nf4-gptq" and d.calibration and not is_quantized(self.model):
            quantize_gptq(self.model, d.calibration, self.say)  # the whole-model loader's path

    def setup_data(self) -> None:
        """Reads and tokenizes the training and held-out rows, with the tokenizer alone when no model is loaded."""
        from lorakit.loading.tokenizer import load_tokenizer
        tokenizer = self.tokenizer or load_tokenizer(self.o.model, trust_remote_code=self.o.trust_remote_code)
        self.data = prepare_data(self.o, self.model, tokenizer, load_data(self.o, tokenizer, self.say), self.say)

    def make_run_folder(self) -> None:
        """Makes the run folder and its config.yaml, once model and data are known good."""
        # Only now, with model and data loaded, does the run get a folder: a bad input leaves nothing behind and
        # never overwrites the config.yaml an earlier run (and its --resume) depends on.
        if self.writes and self.ckpt is None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_yaml(self.o), encoding="utf-8")

    def describe(self) -> None:
        """Counts the steps and starts the results dict and the metrics log."""
        o, d, model = self.o, self.data, self.model
        self.n_steps = total_steps(len(d.train_examples), o.batch_size, o.grad_accum, o.max_steps, o.epochs,
                                   self.world)
        self.do_acc = o.accuracy and bool(d.eval_records)
        self.trackers = (Trackers(self.report_to, self.out, o.to_dict(), resume=self.ckpt is not None)
                         if self.writes and self.report_to else None)
        self.metrics = TrackedMetrics(MetricsLog(self.out, enabled=self.writes), self.trackers)
        self.results = {"options": o.to_dict(), "command": self.command or "lorakit train", "world_size": self.world,
                        "model_name": getattr(model.config, "_name_or_path", o.model),
                        "model_parameters": sum(p.numel() for p in model.parameters()), "data_name": d.name,
                        "train_examples": len(d.train_examples), "truncated": d.stats.get("truncated", 0),
                        "skipped_rows": d.skipped, "eval_rows": len(d.eval_records), "steps": self.n_steps}

    def accuracy(self, with_loss: bool = False) -> dict:
        """Returns evaluate_accuracy of the model now on the held-out rows (with_loss: and their loss, from the
        same forward)."""
        o = self.o
        return evaluate_accuracy(self.model, self.tokenizer, self.data.eval_records, template=o.template,
                                 system=o.system, batch_size=o.eval_batch_size, max_new_tokens=o.max_new_tokens,
                                 with_loss=with_loss, max_seq_len=o.max_seq_len)

    def measure_baseline(self) -> None:
        """Measures the un-tuned model's accuracy (skipped on resume: the first run measured it)."""
        if self.do_acc and self.o.baseline_eval and self.ckpt is None:
            self.say(f"measuring the un-tuned model's accuracy on {len(self.data.eval_records)} held-out rows ...")
            self.before = self.accuracy()
            self.metrics.write({"step": 0, "accuracy": self.before["accuracy"], "per_task": self.before["per_task"],
                                "phase": "before"})
            self.say(f"before training: accuracy {100 * self.before['accuracy']:.1f}%")

    def setup_lora(self) -> None:
        """Injects LoRA (with gradient checkpointing, adaptive rank and torch.compile when asked)."""
        o, model = self.o, self.model
        torch.manual_seed(o.seed)  # LoRA init independent of whatever ran before
        lorakit.inject(model, o.lora_config())
        from lorakit.train.router_aux import set_router_aux_loss
        aux_weight = set_router_aux_loss(model, o.router_aux_loss)
        if aux_weight:
            self.say(f"router auxiliary loss: weight {aux_weight:g}")
        if o.gradient_checkpointing:
            from lorakit.model.activation_checkpointing import enable_gradient_checkpointing
            enable_gradient_checkpointing(model, offload=o.offload_activations)
        if o.adaptive_rank:  # before the optimizer: it swaps the A factors for P·diag(λ)·Q triplets
            from lorakit.train.adaptive import enable_adaptive_rank
            warmup, final = o.adaptive_phases(self.n_steps)
            c = self.controller = enable_adaptive_rank(model, None, o.adaptive_target(), self.n_steps, warmup, final,
                                                       orth_reg=o.adaptive_orth_reg, interval=o.adaptive_interval,
                                                       seed=o.seed)
            self.say(f"adaptive rank: r={o.r} -> an average of {o.adaptive_target()} over {len(c.layers)} modules "
                     f"(budget {c.init_budget} -> {c.target_budget}; warmup {warmup}, final {final} steps)")
        if o.compile:
            from lorakit.model.compiling import compile_blocks
            # dynamic shapes from the start: padded batches change length every step (one compile, not two)
            n_blocks = compile_blocks(model, dynamic=None if o.packing else True)
            self.say(f"torch.compile: {n_blocks} blocks share one compiled training graph "
                     f"(compiled during the first step)")
        trainable, total = lorakit.trainable_parameters(model)
        self.results["trainable_parameters"] = trainable
        self.say(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%); "
                 f"{len(self.data.train_examples)} examples, {self.n_steps} steps of {o.batch_size} x "
                 f"{o.grad_accum} x {self.world}")

    def setup_optimizer(self) -> None:
        """Builds the optimizer and schedule, resumes from the checkpoint, and wraps the model for DDP/FSDP."""
        from lorakit.model.memory import format_memory_report, memory_report
        o, model = self.o, self.model
        self.optimizer = self.optimizer_fn(model, o.lr, o.weight_decay, o.lora_plus_ratio, o.adam_betas)
        self.results["memory"] = memory_report(model, self.optimizer)  # AdamW's moments before its first step
        self.say("memory (weights, gradients and optimizer state; activations come on top):\n"
                 + format_memory_report(self.results["memory"]))
        self.scheduler = build_scheduler(self.optimizer, o.warmup_steps, self.n_steps, o.min_lr_ratio)
        if self.controller is not None:
            self.scheduler = SchedulerWithAdaptive(self.scheduler, self.controller, model_device(model))
        if self.ckpt is not None:
            state, self.position = load_checkpoint(self.ckpt, model, self.optimizer, self.scheduler)
            if self.writes:  # the checkpoint fits these options: from now on they are the run's
                (self.out / "config.yaml").write_text(dump_yaml(o), encoding="utf-8")
            self.step, self.tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
            self.before = state.get("accuracy_before")
            self.metrics.truncate_after(self.step)
            self.say(f"resumed from {self.ckpt} at step {self.step}")
        # DDP / FSDP2 / as-is; self.model stays plain for eval and saving
        self.train_model = wrap_for_distributed(model, o.strategy, o.batch_size, o.grad_accum, log=self.say)

    # ------------------------------------------------------------------------------------------ steps
    def run_steps(self) -> None:
        """Runs optimizer steps until n_steps, a stop signal, or a hook's should_stop."""
        o, d = self.o, self.data
        batches = iterate_batches(d.train_examples, o.batch_size, o.seed, self.position, d.pad_id, self.rank,
                                  self.world, group_by_length=o.group_by_length,
                                  padding_free=resolve_padding_free(o.padding_free, self.model))
        for h in self.hooks:
            h.on_train_start(self)
        t_train = time.time()
        console = self.console
        if console.is_terminal if console is not None else is_terminal():
            progress = ProgressBar(self.main and o.progress, self.n_steps, self.step, console)
        else:  # a log file or pipe: plain lines
            progress = PlainProgress(self.main and o.progress, self.n_steps, self.step, o.progress_every,
                                     None if console is None else lambda s: console.print(s, soft_wrap=True,
                                                                                           highlight=False))
        with StopRequest() as stop, progress as bar:
            while self.step < self.n_steps:
                t0 = time.time()
                result = self.step_fn(self.train_model, [next(batches) for _ in range(o.grad_accum)], self.optimizer,
                                      self.scheduler, o.max_grad_norm, **self.adaptive_step_args())
                stop.signum = agree_stop(stop.signum)  # distributed: every rank stops after the same step
                self.step += 1
                self.step_seconds = time.time() - t0
                self.record_step(result, bar)
                for h in self.hooks:
                    h.on_step_end(self, result)
                if o.eval_every and self.step % o.eval_every == 0 and d.eval_examples and self.step < self.n_steps:
                    self.evaluate()
                early = any(h.should_stop(self) for h in self.hooks)
                if self.writes and ((o.save_every and self.step % o.save_every == 0 and self.step < self.n_steps)
                                    or stop.signum):
                    self.save_checkpoint()
                if stop.signum:
                    self.stopped, self.stop_signal = f"{stop.name} at step {self.step}", stop.name
                    break
                if early:
                    self.results["stopped_early"] = self.step
                    self.say(f"a hook stopped the run at step {self.step}")
                    break
        self.results["train_seconds"] = time.time() - t_train
        self.results["final_loss"] = self.last_loss
        for h in self.hooks:
            h.on_train_end(self)

    def adaptive_step_args(self) -> dict:
        """Returns the step function's adaptive-rank arguments (penalty, controller update); {} without it."""
        c, step = self.controller, self.step
        return {} if c is None else dict(extra_loss=c.penalty, after_update=lambda: c.step(self.model, step))

    def record_step(self, result, bar) -> None:
        """Handles a non-finite step (nan_policy), then logs the step's metrics and moves the progress bar."""
        o = self.o
        if not result.finite:
            if o.nan_policy == "stop":
                last = find_latest_checkpoint(self.out, lambda m: None) if self.write_files else None
                raise TrainingDiverged(
                    f"non-finite loss at step {self.step}: {result.bad} went NaN/Inf first. "
                    + (f"The last good checkpoint is {last}; resume from it with a lower --lr "
                       f"(or set nan_policy=skip)." if last else "No checkpoint was written before it; "
                       "lower --lr, or set nan_policy=skip to skip such steps."))
            self.say(f"step {self.step}: non-finite loss ({result.bad}); update skipped (nan_policy=skip)")
        else:
            self.last_loss = result.loss
        self.tokens_seen += result.input_tokens
        tps = result.input_tokens / max(self.step_seconds, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        if self.step % o.log_every == 0 or self.step == self.n_steps:
            self.metrics.write({"step": self.step, "loss": result.loss, "lr": lr, "tokens_per_s": round(tps, 1),
                                "grad_norm": result.grad_norm, "epoch": self.position.epoch,
                                "tokens_seen": self.tokens_seen, "finite": result.finite,
                                **({"rank_budget": self.controller.budget} if self.controller is not None else {})})
        bar(self.step, result.loss, lr, tps)

    def evaluate(self, loss: float | None = None) -> float:
        """Returns (and logs) the held-out loss now (`loss`: already measured by the accuracy pass); hooks'
        on_eval see it."""
        d = self.data
        self.eval_loss = evaluate_loss(self.model, d.eval_examples, self.o.eval_batch_size, d.pad_id) \
            if loss is None else loss
        self.eval_step = self.step
        self.metrics.write({"step": self.step, "eval_loss": self.eval_loss})
        for h in self.hooks:
            h.on_eval(self, self.eval_loss)
        return self.eval_loss

    def save_checkpoint(self) -> None:
        """Writes a checkpoint of this step and prunes old ones."""
        save_checkpoint(self.out, self.step, self.model, self.optimizer, self.scheduler, self.position,
                        {"tokens_seen": self.tokens_seen, "accuracy_before": self.before, "world_size": self.world})
        prune_checkpoints(self.out, self.o.keep_checkpoints)

    # ------------------------------------------------------------------------------------------ finish
    def finish(self) -> dict:
        """Final eval and accuracy, the adapter and the run's files; returns the results dict."""
        results, out = self.results, self.out
        if self.stopped:
            results.update(stopped=self.stopped, exit_code=EXIT_CODES.get(self.stop_signal, 1), steps_done=self.step)
            self.say(f"stopped by {self.stopped}; checkpoint written to {out / 'checkpoints'}. "
                     f"Continue with: lorakit train --out {out} --resume")
        else:
            if self.writes:
                self.save_checkpoint()
            if self.controller is not None:
                # after the last checkpoint (it keeps the triplet form a resume needs); exact: pruned λ are zero
                ranks = self.controller.finalize(self.model)
                results["adaptive_ranks"] = ranks
                self.say(f"adaptive rank: {sum(ranks.values())} = budget {self.controller.target_budget} over "
                         f"{len(ranks)} modules, ranks {min(ranks.values())}..{max(ranks.values())}")
            after, held = None, bool(self.data.eval_examples) and self.eval_step != self.step
            if self.do_acc:  # the run's measured result; its held-out loss comes from the same forward
                self.say("measuring held-out accuracy after training ...")
                after = self.accuracy(with_loss=held)
                if held:
                    after.pop("target_tokens")
                    self.evaluate(after.pop("loss"))
                self.metrics.write({"step": self.step, "accuracy": after["accuracy"], "per_task": after["per_task"],
                                    "phase": "after"})
            elif held and (self.o.final_eval_loss if self.o.final_eval_loss is not None else True):
                self.evaluate()  # a pass of its own: asked for, or (auto) the run's only held-out result
            results.update(accuracy_before=self.before, accuracy_after=after, exit_code=0, steps_done=self.step)
            if self.writes:
                lorakit.save_adapter(self.model, out / "adapter")
        results["eval_loss"], results["eval_loss_step"] = self.eval_loss, self.eval_step
        if self.trackers is not None:
            results["trackers"] = self.trackers.where()
            self.trackers.close()
        results["total_seconds"] = time.time() - self.t_start
        results["out"] = str(out)
        if self.writes:
            plot_metrics(out)
            write_readme(out, results)
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        results["model"], results["tokenizer"] = self.model, self.tokenizer
        return results


def train(o: TrainOptions, command: str | None = None, console=None, hooks: Sequence[Hooks] = (), **recipe) -> dict:
    """Runs the whole recipe for `o`; returns the results dict (also written to out/results.json).

    `hooks` watch or stop the run; `recipe` takes Recipe's keywords (step_fn, optimizer_fn, write_files ...).
    """
    return Recipe(o, command, console, hooks, **recipe).run()


def command_line(o: TrainOptions) -> str:
    """Returns a `lorakit train key=value ...` command that reproduces the options (non-defaults only)."""
    default = TrainOptions().to_dict()
    parts = [f"{k}={v if isinstance(v, (int, float, str)) else json.dumps(v)}"
             for k, v in o.to_dict().items() if v != default[k] and k not in ("resume",)]
    return "lorakit train " + " ".join(shlex.quote(p) for p in parts)
