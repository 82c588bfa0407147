"""The whole default job: `lorakit train` against TRL's SFTTrainer + PEFT, the script most users would write.

    parent ─┬─ lorakit rows: the recipe's own tokenization and batch order (train.batching.iterate_batches)
            ├─ run 1: `python -m lorakit train seed=S ...` (a subprocess; its RssAnon sampled every 50 ms)
            ├─ run 2: this file --worker trl (a subprocess): SFTTrainer + peft.LoraConfig on exactly those rows,
            │         token ids, response-only loss masks and row order; it records every batch it collated
            ├─ check: both saw the same token ids and loss masks, batch by batch
            └─ score: both adapters by the same evaluator (`lorakit eval --json`: held-out exact-match accuracy)

Same base (the embedded SmolLM2-135M-Instruct, loaded by lorakit.loading.pretrained.load_model on both sides), same
training rows, chat template and masks, 60 steps of batch 8, AdamW lr 1e-3 (betas 0.9/0.999, no weight decay,
clip 1.0) with lorakit's warmup + cosine schedule (TRL gets it as a LambdaLR over lorakit's lr_factor), LoRA r=16
alpha=32 on all linear layers, seed S; fp32, no gradient checkpointing, no evaluation during training, no
checkpoint beyond lorakit's defaults. Both draw the LoRA init from the same seed in the same
module order (measured 2026-11-28: the two runs end at the same loss and accuracy); the 3 seeds show the spread.

Recorded per run: whole wall (process start to exit), training time (the run's own train loop), tokens/s of
real (non-pad) tokens over the training time, padded tokens per real token, peak RssAnon, final loss, held-out
accuracy, and the machine's load (loadavg + the cores other processes used during the run, bench/machine.py).
A run is 'quiet' when the other processes used at most 0.25 cores on average; otherwise its ratios are
printed but marked loaded and no target is claimed from them.

    python bench/vs_trl.py --seeds 42,1,2                    # the issue's comparison (~30 min on 2 quiet cores)
    python bench/vs_trl.py --small                           # rehearsal: 3 steps, 16 held-out rows (~3 min)
    python bench/vs_trl.py --small --model DIR --data t.jsonl --eval-data e.jsonl   # the smoke test's tiny model
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))  # this checkout's lorakit
import machine  # noqa: E402  (bench/machine.py: the one quiet-machine check)

ROOT = HERE.parent
ENV = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
           PYTHONPATH=os.pathsep.join([str(ROOT / "src")] + [p for p in os.environ.get("PYTHONPATH", "").split(
               os.pathsep) if p]))


# ============================================================================ the rows lorakit trains on
def lorakit_options(a, seed: int, out: Path | None = None):
    """Returns the TrainOptions of the compared job (the defaults, minus evaluation during training)."""
    from lorakit.train.options import load_options
    return load_options(None, lorakit_overrides(a, seed, out))


def lorakit_overrides(a, seed: int, out: Path | None) -> list[str]:
    """Returns the key=value overrides `lorakit train` gets: no eval during or after training, no progress bar."""
    o = [f"seed={seed}", f"max_steps={a.steps}", "eval_every=0", "baseline_eval=false", "accuracy=false",
         "progress=false", "final_eval_loss=false"]
    o += [f"{k}={v}" for k, v in (("model", a.model), ("data", a.data), ("eval_data", a.eval_data)) if v]
    return o + ([f"out={out}"] if out else [])


def lorakit_batches(a, seed: int) -> list[list[dict]]:
    """Returns the micro-batches `lorakit train` will see, as rows {input_ids, labels} without padding.

    Computed by the recipe's own functions (tokenize_training, iterate_batches) for the same options.
    """
    from lorakit.loading.pretrained import load_model
    from lorakit.train.batching import DataPosition, iterate_batches
    from lorakit.train.prepare import load_data, tokenize_training

    o = lorakit_options(a, seed)
    _, tokenizer = load_model(o.model)
    examples, _ = tokenize_training(o, load_data(o, tokenizer, lambda *x: None)["train_records"], tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = iterate_batches(examples, o.batch_size, o.seed, DataPosition(), pad, group_by_length=o.group_by_length)
    return [uncollate(next(stream)) for _ in range(o.max_steps * o.grad_accum)]


def lorakit_padding_free(a, seed: int) -> bool:
    """Returns whether `lorakit train` runs these batches padding-free (one row each: no pad token computed)."""
    from lorakit.loading.pretrained import load_model
    from lorakit.train.batching import resolve_padding_free
    o = lorakit_options(a, seed)
    return resolve_padding_free(o.padding_free, load_model(o.model)[0])


def uncollate(batch) -> list[dict]:
    """Returns the rows of a right-padded batch: {input_ids, labels} with the padding cut off."""
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        rows.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
    return rows


def fingerprint(batches: list[list[dict]]) -> list[str]:
    """Returns one hash per batch over its rows' token ids and loss masks (what both trainers must agree on)."""
    import hashlib
    out = []
    for rows in batches:
        h = hashlib.sha256()
        for r in rows:
            h.update(json.dumps([r["input_ids"], [int(x != -100) for x in r["labels"]]]).encode())
        out.append(h.hexdigest()[:16])
    return out


# ============================================================================ TRL worker
def trl_worker(spec: dict) -> None:
    """Trains with TRL SFTTrainer + PEFT on spec's rows, in order; writes spec['result'] (JSON)."""
    t_start = spec["t_start"]
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lorakit.loading.pretrained import load_model
    from lorakit.train.optim import lr_factor

    rows = json.loads(Path(spec["rows"]).read_text())
    model, tokenizer = load_model(spec["model"])  # the same base weights lorakit loads
    data = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": [int(x != -100) for x in r["labels"]]}
                              for r in rows])
    o = spec["options"]
    args = SFTConfig(output_dir=spec["out"], max_steps=o["max_steps"], per_device_train_batch_size=o["batch_size"],
                     gradient_accumulation_steps=o["grad_accum"], learning_rate=o["lr"], weight_decay=o["weight_decay"],
                     adam_beta1=o["adam_betas"][0], adam_beta2=o["adam_betas"][1], max_grad_norm=o["max_grad_norm"],
                     seed=o["seed"], data_seed=o["seed"], train_sampling_strategy="sequential", logging_steps=1,
                     save_strategy="no", eval_strategy="no", report_to="none", bf16=False, fp16=False,
                     use_cpu=spec["device"] == "cpu", gradient_checkpointing=False, completion_only_loss=True,
                     max_length=None, packing=False, padding_free=False, shuffle_dataset=False,
                     dataloader_num_workers=0, disable_tqdm=True, dataset_num_proc=None)
    peft_config = LoraConfig(r=o["r"], lora_alpha=o["lora_alpha"], lora_dropout=o["lora_dropout"],
                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM")
    seen: list[list[dict]] = []

    class Recorder:  # the collator TRL built, recording what every batch holds
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, features):
            batch = self.inner(features)
            rows = []
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
                n = int(mask.sum())
                rows.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist(), "width": len(ids)})
            seen.append(rows)
            return batch

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Losses()])
    trainer.data_collator = Recorder(trainer.data_collator)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o["lr"], betas=tuple(o["adam_betas"]), weight_decay=o["weight_decay"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, o["warmup_steps"], o["max_steps"], o["min_lr_ratio"]))
    trainer.optimizer, trainer.lr_scheduler = optimizer, scheduler
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    trainer.model.save_pretrained(Path(spec["out"]) / "adapter")
    # the real tokens are the rows' own; the labels' first token is never a target (shifted), so compare masks
    result = {"train_seconds": train_s, "final_loss": losses[-1] if losses else None, "losses": losses,
              "fingerprint": fingerprint(seen), "padded_tokens": sum(r[0]["width"] * len(r) for r in seen),
              "real_tokens": sum(len(x["input_ids"]) for r in seen for x in r),
              "trainable_parameters": sum(p.numel() for p in params),
              "setup_seconds": t0 - t_start}
    Path(spec["result"]).write_text(json.dumps(result))


# ============================================================================ parent
class RssSampler:
    """Samples a process's RssAnon (anonymous resident memory: what the run allocated) every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.05):
        self.pid, self.every, self.peak_kib, self._stop = pid, every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while not self._stop.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                            break
            except OSError:
                return
            time.sleep(self.every)

    def stop(self) -> float:
        """Stops sampling; returns the peak in MiB."""
        self._stop.set()
        self.thread.join()
        return self.peak_kib / 1024


def run_measured(cmd: list[str], log) -> dict:
    """Runs cmd; returns {wall_s, peak_rss_anon_mib, cpu_s, others_cores, util_cores, load_before, load_after}."""
    load_before = machine.load_report()
    r0 = os.times()
    s0, t0 = machine.busy_jiffies(), time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(proc.pid)
    output = proc.communicate()[0]
    wall = time.perf_counter() - t0
    peak = sampler.stop()
    s1, r1 = machine.busy_jiffies(), os.times()
    if proc.returncode != 0:
        log(output[-3000:])
        raise RuntimeError(f"{cmd[:4]} ... exited with status {proc.returncode}")
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    return {"wall_s": wall, "peak_rss_anon_mib": peak, "cpu_s": cpu, "util_cores": cpu / wall,
            "others_cores": max(0.0, (s1 - s0) - cpu) / wall, "load_before": load_before,
            "load_after": machine.load_report(), "output_tail": output[-1500:]}


def score(a, adapter: Path, log) -> dict:
    """Returns `lorakit eval --json` on adapter (held-out accuracy, loss) plus its wall time."""
    cmd = [sys.executable, "-m", "lorakit", "eval", "--adapter", str(adapter), "--json"]
    cmd += ["--model", a.model] if a.model else []
    cmd += ["--data", a.eval_data] if a.eval_data else []
    cmd += ["--limit", str(a.eval_limit)] if a.eval_limit else []
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        log(proc.stderr[-3000:])
        raise RuntimeError(f"lorakit eval on {adapter} exited with status {proc.returncode}")
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def one_seed(a, seed: int, work: Path, log) -> dict:
    log(f"seed {seed}: computing lorakit's batches ...")
    batches = lorakit_batches(a, seed)
    rows = [r for b in batches for r in b]
    real = sum(len(r["input_ids"]) for r in rows)
    padded = sum(max(len(r["input_ids"]) for r in b) * len(b) for b in batches)
    free = lorakit_padding_free(a, seed)
    computed = real if free else padded  # lorakit's tokens per step; TRL pads each batch to its longest row
    rows_file = work / f"rows-{seed}.json"
    rows_file.write_text(json.dumps(rows))
    res = {"seed": seed, "real_tokens": real, "padded_tokens": padded, "lorakit_padding_free": free,
           "lorakit_computed_tokens": computed, "pad_ratio": computed / real, "trl_pad_ratio": padded / real}
    log(f"seed {seed}: {len(rows)} rows in {len(batches)} batches, {real} real tokens; lorakit computes "
        f"{computed} ({computed / real:.3f}x, {'padding-free' if free else 'padded'}), TRL {padded} "
        f"({padded / real:.3f}x)")

    order = ["lorakit", "trl"] if seed % 2 == 0 else ["trl", "lorakit"]  # alternate: drifts hit both alike
    for who in order:
        if a.max_wait:
            machine.wait_quiet(a.max_wait, log=log)
        out = work / f"{who}-{seed}"
        if who == "lorakit":
            cmd = [sys.executable, "-m", "lorakit", "train", *lorakit_overrides(a, seed, out)]
            m = run_measured(cmd, log)
            r = json.loads((out / "results.json").read_text())
            m.update(train_seconds=r["train_seconds"], final_loss=r["final_loss"],
                     trainable_parameters=r["trainable_parameters"])
        else:
            o = lorakit_options(a, seed).to_dict()
            spec = {"rows": str(rows_file), "out": str(out), "result": str(work / f"trl-{seed}.json"),
                    "model": o["model"], "options": o, "device": a.device, "t_start": None}
            spec_file = work / f"trl-spec-{seed}.json"
            spec_file.write_text(json.dumps(spec))
            m = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)], log)
            t = json.loads((work / f"trl-{seed}.json").read_text())
            if t["fingerprint"] != fingerprint(batches):
                bad = next(i for i, (x, y) in enumerate(zip(t["fingerprint"], fingerprint(batches))) if x != y)
                raise AssertionError(f"seed {seed}: TRL's batch {bad} differs from lorakit's (token ids or masks)")
            if t["real_tokens"] != real:
                raise AssertionError(f"seed {seed}: TRL saw {t['real_tokens']} real tokens, lorakit {real}")
            m.update({k: t[k] for k in ("train_seconds", "final_loss", "losses", "trainable_parameters",
                                        "padded_tokens")}, same_batches_as_lorakit=True)
        m["tokens_per_s"] = real / m["train_seconds"]
        m["quiet"] = m["others_cores"] <= machine.MAX_OTHER
        m["eval"] = score(a, out / "adapter", log)
        m["accuracy"] = m["eval"]["accuracy"]
        m.pop("output_tail")
        res[who] = m
        log(f"seed {seed} {who}: wall {m['wall_s']:.1f} s, train {m['train_seconds']:.1f} s, "
            f"{m['tokens_per_s']:.0f} real tok/s, peak RssAnon {m['peak_rss_anon_mib']:.0f} MiB, "
            f"final loss {m['final_loss']:.4f}, accuracy {100 * m['accuracy']:.1f}%; "
            f"others {m['others_cores']:.2f} cores, loadavg {m['load_before']['loadavg_1m']}"
            + ("" if m["quiet"] else " (LOADED)"))
    res["ratios"] = {k: res["lorakit"][f] / res["trl"][f] for k, f in
                     (("wall", "wall_s"), ("train", "train_seconds"), ("peak_rss", "peak_rss_anon_mib"))}
    res["quiet"] = res["lorakit"]["quiet"] and res["trl"]["quiet"]
    return res


TARGETS = {"wall": 0.55, "train": 0.5, "peak_rss": 0.6}


def summary(runs: list[dict]) -> dict:
    """Returns mean ratios, mean accuracies and the target verdicts (claimed only from quiet runs)."""
    mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
    s = {"ratios": {k: mean([r["ratios"][k] for r in runs]) for k in TARGETS},
         "accuracy": {w: mean([r[w]["accuracy"] for r in runs]) for w in ("lorakit", "trl")},
         "pad_ratio": mean([r["pad_ratio"] for r in runs]),
         "quiet_runs": sum(r["quiet"] for r in runs), "runs": len(runs)}
    all_quiet = s["quiet_runs"] == len(runs)
    s["targets"] = {k: ("met" if s["ratios"][k] <= t else "missed") if all_quiet else "not claimed (loaded machine)"
                    for k, t in TARGETS.items()}
    gap = s["accuracy"]["trl"] - s["accuracy"]["lorakit"]
    s["targets"]["accuracy"] = "met" if gap <= 0.01 else f"missed by {100 * (gap - 0.01):.1f} points"
    s["targets"]["pad_ratio"] = "met" if s["pad_ratio"] <= 1.05 else "missed"
    return s


def table(report: dict) -> str:
    """Returns the README-ready markdown table."""
    lines = ["| seed | | whole wall s | train s | real tok/s | peak RssAnon MiB | final loss | accuracy | "
             "others (cores) / loadavg |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["runs"]:
        for who in ("lorakit", "trl"):
            m = r[who]
            lines.append(f"| {r['seed']} | {'lorakit' if who == 'lorakit' else 'TRL + PEFT'} | {m['wall_s']:.1f} | "
                         f"{m['train_seconds']:.1f} | {m['tokens_per_s']:.0f} | {m['peak_rss_anon_mib']:.0f} | "
                         f"{m['final_loss']:.4f} | {100 * m['accuracy']:.1f}% | {m['others_cores']:.2f} / "
                         f"{m['load_before']['loadavg_1m']}{'' if m['quiet'] else ' (loaded)'} |")
        q = r["ratios"]
        lines.append(f"| {r['seed']} | **lorakit / TRL** | **{q['wall']:.2f}x** | **{q['train']:.2f}x** | | "
                     f"**{q['peak_rss']:.2f}x** | | | |")
    s = report["summary"]
    lines += ["", f"Mean over {s['runs']} seed(s): whole wall {s['ratios']['wall']:.2f}x (target <= 0.55: "
              f"{s['targets']['wall']}), training {s['ratios']['train']:.2f}x (<= 0.5: {s['targets']['train']}), "
              f"peak RssAnon {s['ratios']['peak_rss']:.2f}x (<= 0.6: {s['targets']['peak_rss']}); held-out accuracy "
              f"lorakit {100 * s['accuracy']['lorakit']:.1f}% vs TRL {100 * s['accuracy']['trl']:.1f}% "
              f"({s['targets']['accuracy']}); lorakit's computed / real tokens {s['pad_ratio']:.3f} ({s['targets']['pad_ratio']}). "
              f"{s['quiet_runs']} of {s['runs']} seed(s) ran on a quiet machine."]
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="42,1,2", help="comma-separated seeds (default: 42,1,2)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 60, the default job; "
                   "--small: 3)")
    p.add_argument("--small", action="store_true", help="rehearsal: 3 steps, one seed, 16 held-out rows")
    p.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2)")
    p.add_argument("--data", default=None, help="training rows (default: the embedded dataset)")
    p.add_argument("--eval-data", default=None, help="held-out rows (default: the embedded held-out split)")
    p.add_argument("--eval-limit", type=int, default=None, help="score on at most N held-out rows")
    p.add_argument("--device", default="cpu", help="cpu (the issue's comparison) or cuda")
    p.add_argument("--max-wait", type=float, default=0.0, help="wait up to N s for a quiet machine before each run")
    p.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: bench/results/vs_trl.json; "
                   "--small: <work>/vs_trl.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.small:
        a.steps = a.steps or 3
        a.eval_limit = a.eval_limit or 16
        a.seeds = a.seeds if "--seeds" in (argv or sys.argv) else "42"
    a.steps = a.steps or 60
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker:
        spec = json.loads(Path(a.worker).read_text())
        spec["t_start"] = time.time()
        trl_worker(spec)
        return 0
    import tempfile
    work = a.work or Path(tempfile.mkdtemp(prefix="vs_trl-"))
    work.mkdir(parents=True, exist_ok=True)
    out = a.out or (work / "vs_trl.json" if a.small else HERE / "results" / "vs_trl.json")
    log = lambda m: print(m, flush=True)  # noqa: E731
    import importlib.metadata as md
    versions = {k: md.version(k) for k in ("torch", "transformers", "peft", "trl", "datasets")}
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    runs: list[dict] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for s in a.seeds.split(","):  # the JSON is rewritten after every seed: a cut-short run keeps what it measured
        runs.append(one_seed(a, int(s), work, log))
        report = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  "started": started, "versions": versions, "cores": os.cpu_count(), "steps": a.steps,
                  "small": a.small, "runs": runs, "summary": summary(runs)}
        report["markdown"] = table(report)
        out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["markdown"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
