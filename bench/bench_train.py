"""Training-step speed and peak memory: lorakit LoRA vs PEFT LoRA vs full fine-tuning vs the floor.

    parent ──spawn──► one worker process per mode (its own model, its own peak RSS)
       │  round 1:  lorakit  peft  full  floor  lorakit-gc  lorakit-gc-ce  base  unmerged  merged
       │  round 2:  lorakit  peft  full  ...                 (interleaved: slow drifts hit every mode alike)
       └─ medians of the quiet steps ─► table (absolute + ratios) ─► JSON

Every worker builds the same random-init Llama (same seed), warms up, then runs ONE step each time the parent
asks. A step counts as quiet when the process got ~`threads` cores of CPU time for its wall time and the rest
of the machine stayed idle (from /proc/stat); a noisy step is retried after a pause and the measured
utilisation is recorded either way. Modes:

    lorakit     lorakit.inject LoRA (r, alpha on q,k,v,o,gate,up,down), AdamW on the factors
    lorakit-unfused lorakit without fuse_shared_inputs (inject links q,k,v and gate,up to one A GEMM by default)
    peft        peft.get_peft_model with the same LoRA config
    full        every weight trainable, AdamW
    floor       every weight frozen, gradients only w.r.t. the input embeddings (no optimizer)
    lorakit-gc  lorakit with gradient checkpointing (non-reentrant)
    lorakit-gc-ce   lorakit-gc with the recipe's loss, lorakit.train.step.loss_sum: for Llama-style models the
                chunked head (functional.linear_cross_entropy) never holds all 4 x 256 x 32000 logits; same loss.
                This is what `lorakit train --gradient-checkpointing` runs
    compile     lorakit with its decoder blocks compiled (lorakit.compiling.compile_blocks), as `lorakit train
                --compile` runs it
    infer       forward-only latency (eval, no_grad): base model vs lorakit unmerged vs merged
    embedded    lorakit (fused, unfused, compiled) and PEFT on the embedded model (skipped when not installed)

    python bench/bench_train.py --small                      # quick check (~1 minute)
    python bench/bench_train.py --out bench/results/x.json   # the issue's config (~10 minutes)
    python bench/bench_train.py --preset 1b --device cuda --dtype bfloat16 --modes lorakit,peft,floor,full,infer

On CUDA every step is synchronized, the quiet-machine check is off (the GPU is the busy part), and memory is
the peak of torch.cuda.max_memory_allocated in each worker (besides the process's peak RSS). The 1b preset is
Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, vocab 128256).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  (bench/machine.py: the one quiet-machine check)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    "full": dict(hidden=1024, layers=8, heads=16, intermediate=2816, vocab=32000, batch=4, seq=256, steps=5, warmup=2),
    "small": dict(hidden=256, layers=2, heads=4, intermediate=704, vocab=4000, batch=2, seq=128, steps=7, warmup=2),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, batch=8, seq=1024,
               steps=10, warmup=3),
}
TRAIN_MODES = ["lorakit", "lorakit-unfused", "peft", "full", "floor", "lorakit-gc", "lorakit-gc-ce", "compile"]
ALL_MODES = TRAIN_MODES + ["infer", "embedded"]
DEFAULT_MODES = ["lorakit", "peft", "full", "floor", "lorakit-gc", "lorakit-gc-ce", "infer"]
INFER_VARIANTS = ["base", "unmerged", "merged"]
EMBEDDED_VARIANTS = ["embedded-lorakit", "embedded-lorakit-unfused", "embedded-lorakit-compile", "embedded-peft"]


# ============================================================================ measuring
def on_cuda(device: str) -> bool:
    return device.startswith("cuda")


def sync(device: str) -> None:
    if on_cuda(device):
        import torch
        torch.cuda.synchronize()


def timed(fn, device: str = "cpu") -> dict:
    """Runs fn() once; returns wall seconds, this process's CPU cores used, and the other processes' cores."""
    return machine.timed(fn, before=lambda: sync(device), after=lambda: sync(device))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_gpu_mib(device: str) -> float | None:
    if not on_cuda(device):
        return None
    import torch
    return torch.cuda.max_memory_allocated(device) / 2**20


# ============================================================================ worker side
def build_model(a, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                      num_key_value_heads=a.kv_heads or a.heads, intermediate_size=a.intermediate, vocab_size=a.vocab,
                      max_position_embeddings=max(2048, a.seq), tie_word_embeddings=False, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(a.device):  # built where it runs: a 1B model in fp32 on the CPU first would double memory
        model = LlamaForCausalLM(cfg)
    return model.to(getattr(torch, a.dtype))


def lorakit_model(model, a, fuse: bool = True):
    import lorakit
    lorakit.inject(model, lorakit.LoraConfig(r=a.rank, lora_alpha=a.alpha, target_modules=TARGETS))
    if not fuse:
        lorakit.unfuse(model)
    return model


def peft_model(model, a):
    import peft
    return peft.get_peft_model(model, peft.LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0,
                                                      target_modules=TARGETS))


def enable_checkpointing(model) -> None:
    import lorakit
    lorakit.enable_gradient_checkpointing(model)  # non-reentrant, as `lorakit train --gradient-checkpointing`


def train_step_fn(mode: str, a):
    """Returns step() -> None for a training mode, with its model and optimizer built."""
    import torch
    if mode.startswith("embedded"):
        from lorakit.models import load_model
        model = load_model(None)[0].to(a.device, getattr(torch, a.dtype))
        vocab = model.config.vocab_size
    else:
        model = build_model(a)
        vocab = a.vocab
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g).to(a.device)
    model.train()
    if mode in ("lorakit", "lorakit-unfused", "lorakit-gc", "lorakit-gc-ce", "compile", "embedded-lorakit",
                "embedded-lorakit-unfused", "embedded-lorakit-compile"):
        lorakit_model(model, a, fuse=not mode.endswith("-unfused"))
        if mode.startswith("lorakit-gc"):
            enable_checkpointing(model)
        if mode.endswith("compile"):
            from lorakit.compiling import compile_blocks
            compile_blocks(model)
    elif mode in ("peft", "embedded-peft"):
        model = peft_model(model, a)
    elif mode == "floor":
        model.requires_grad_(False)
    elif mode != "full":
        raise ValueError(mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    if mode == "floor":
        emb = model.get_input_embeddings()

        def step():
            x = emb(ids).detach().requires_grad_(True)
            model(inputs_embeds=x, labels=ids).loss.backward()
    elif mode == "lorakit-gc-ce":
        from lorakit.train.step import chunked_head, loss_sum
        assert chunked_head(model) is not None
        batch = {"input_ids": ids, "labels": ids}

        def step():  # the recipe's loss (train.step.loss_sum): the mean next-token loss, never all N x vocab logits
            opt.zero_grad(set_to_none=True)
            total, n = loss_sum(model, batch)
            (total / n).backward()
            opt.step()
    else:
        def step():
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    return step


def infer_setup(a):
    """Returns (base forward, lorakit forward, the lorakit model): eval mode, no_grad, B non-zero."""
    import torch
    import lorakit
    from lorakit.inject import lora_layers
    base = build_model(a).eval()
    adapted = lorakit_model(copy.deepcopy(base), a).eval()
    with torch.no_grad():  # non-zero B, as after training
        for _, layer in lora_layers(adapted):
            layer.lora_B["default"].weight.normal_(0, 0.02)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1)).to(a.device)

    def fwd(model):
        def step():
            with torch.no_grad():
                model(input_ids=ids)
        return step

    return fwd(base), fwd(adapted), adapted


def worker(a) -> None:
    """Serves 'step VARIANT' / 'quit' lines on stdin with one JSON line each on stdout."""
    import logging
    import torch
    # peft imports bitsandbytes, which warns about an optional CPU kernel package neither side uses
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    if a.worker == "infer":
        import lorakit
        base_fwd, lora_fwd, adapted = infer_setup(a)

        def run(variant):
            if variant == "merged":  # merge outside the timed region: only the forward is timed
                lorakit.merge(adapted)
                try:
                    return timed(lora_fwd, a.device)
                finally:
                    lorakit.unmerge(adapted)
            return timed(base_fwd if variant == "base" else lora_fwd, a.device)
        variants = INFER_VARIANTS
    elif a.worker == "embedded":
        fns = {}
        for v in EMBEDDED_VARIANTS:
            fns[v] = train_step_fn(v, a)

        def run(variant):
            return timed(fns[variant], a.device)
        variants = EMBEDDED_VARIANTS
    else:
        step = train_step_fn(a.worker, a)

        def run(variant):
            return timed(step, a.device)
        variants = [a.worker]
    for _ in range(a.warmup):
        for v in variants:
            run(v)
    reply({"ready": True, "setup_s": time.perf_counter() - t0, "variants": variants})
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        reply(run(cmd[1]))
    reply({"peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": peak_gpu_mib(a.device)})


def reply(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ============================================================================ parent side
class Worker:
    def __init__(self, mode: str, a, argv: list[str]):
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
                   TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
        self.mode = mode
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", mode, *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self.read()
        self.variants = self.ready.get("variants", [])

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.mode} exited (status {self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def step(self, variant: str) -> dict:
        self.proc.stdin.write(f"step {variant}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        """Returns the worker's peaks: peak_rss_mib, peak_gpu_mib (None off CUDA)."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        peaks = self.read()
        self.proc.wait()
        return peaks


def wait_quiet(a, log) -> float:
    """Waits up to --max-wait seconds for the machine to go idle; returns the last load seen (cores)."""
    return machine.wait_quiet(a.max_wait, a.max_other, log)


def is_quiet(r: dict, a) -> bool:
    if on_cuda(a.device):  # the GPU does the work; the CPU mostly waits on it
        return True
    return machine.is_quiet(r["util"], r["others"], a.threads, a.max_other, a.min_util)


def measure(a, argv, log) -> dict:
    modes = a.modes
    workers: list[Worker] = []
    skipped = {}
    for m in modes:
        log(f"starting {m} ...")
        try:
            workers.append(Worker(m, a, argv))
        except RuntimeError as e:
            if m in ("embedded", "compile"):
                skipped[m] = str(e)
                log(f"  skipped {m}: {e}")
                continue
            raise
    slots = [(w, v) for w in workers for v in w.variants]
    results = {v: [] for _, v in slots}
    rounds = {v: [] for _, v in slots}
    for rnd in range(a.steps):
        for w, v in slots:
            for attempt in range(a.retries + 1):
                if a.max_wait > 0 and not on_cuda(a.device):
                    wait_quiet(a, log)
                r = w.step(v)
                r["quiet"] = is_quiet(r, a)
                results[v].append(r)
                if r["quiet"]:
                    break
                log(f"  {v}: noisy step (util {r['util']:.2f} cores, others {r['others']:.2f}); "
                    + ("retrying" if attempt < a.retries else "keeping it"))
                time.sleep(a.retry_wait)
            rounds[v].append(results[v][-1])
        log(f"round {rnd + 1}/{a.steps}: " + "  ".join(f"{v} {results[v][-1]['wall']:.3f}s" for _, v in slots))
    out = {}
    for w in workers:
        peaks = w.close()
        for v in w.variants:
            rs = results[v]
            quiet = [r for r in rs if r["quiet"]]
            use = quiet if len(quiet) >= max(1, a.steps // 2) else rs
            key = a.metric
            out[v] = {"step_s": statistics.median(r[key] for r in use), "metric": key,
                      "step_s_min": min(r[key] for r in use),
                      "wall_s": statistics.median(r["wall"] for r in use),
                      "cpu_s": statistics.median(r["cpu"] for r in use),
                      "steps_used": len(use), "steps_quiet": len(quiet), "steps_total": len(rs),
                      "util_cores": statistics.median(r["util"] for r in use),
                      "all_cpu_s": [round(r["cpu"], 4) for r in rs],
                      "others_cores": statistics.median(r["others"] for r in use),
                      "tokens_per_s": a.batch * a.seq / statistics.median(r["wall"] for r in use),
                      "peak_rss_mib": peaks["peak_rss_mib"], "peak_gpu_mib": peaks.get("peak_gpu_mib"),
                      "worker": w.mode, "all_steps_s": [round(r["wall"], 4) for r in rs],
                      # each round's last attempt (the step it kept), in round order: for paired ratios
                      "round_s": [round(r[key], 4) for r in rounds[v]]}
            if len(use) != len(quiet):
                out[v]["warning"] = "too few quiet steps: the median includes noisy steps"
    return {"results": out, "skipped": skipped}


RATIOS = [("lorakit", "peft"), ("lorakit", "floor"), ("floor", "peft"), ("lorakit-unfused", "peft"),
          ("lorakit-unfused", "floor"), ("lorakit", "full"), ("peft", "floor"), ("compile", "lorakit"),
          ("unmerged", "base"), ("merged", "base"), ("embedded-lorakit", "embedded-peft"),
          ("embedded-lorakit", "embedded-lorakit-unfused"), ("embedded-lorakit-compile", "embedded-lorakit"),
          ("embedded-lorakit-compile", "embedded-peft")]
MEM_RATIOS = [("lorakit", "peft"), ("lorakit-unfused", "peft"), ("lorakit-gc", "peft"), ("lorakit-gc-ce", "peft"),
              ("compile", "lorakit"), ("lorakit", "floor")]


def paired_ratio(x: dict, y: dict) -> float | None:
    """Returns the median over rounds of x's step / y's step in the same round (None when the rounds differ).

    Steps of one round ran back to back, so a drift of the machine's speed between rounds (other tenants'
    memory traffic, which /proc/stat cannot see) cancels in each round's ratio; the ratio of the two medians
    ("time") does not cancel it."""
    a, b = x.get("round_s", []), y.get("round_s", [])
    if len(a) != len(b) or not a:
        return None
    return statistics.median(u / v for u, v in zip(a, b))


def ratios(res: dict) -> dict:
    t = {f"{x}/{y}": res[x]["step_s"] / res[y]["step_s"] for x, y in RATIOS if x in res and y in res}
    paired = {f"{x}/{y}": paired_ratio(res[x], res[y]) for x, y in RATIOS if x in res and y in res}
    m = {f"{x}/{y}": res[x]["peak_rss_mib"] / res[y]["peak_rss_mib"] for x, y in MEM_RATIOS if x in res and y in res}
    out = {"time": t, "time_paired": {k: v for k, v in paired.items() if v is not None}, "peak_rss": m}
    if any(r.get("peak_gpu_mib") for r in res.values()):
        out["peak_gpu"] = {f"{x}/{y}": res[x]["peak_gpu_mib"] / res[y]["peak_gpu_mib"]
                           for x, y in MEM_RATIOS if x in res and y in res}
    return out


def table(report: dict) -> str:
    res, rat = report["results"], report["ratios"]
    metric = next(iter(res.values()))["metric"] if res else "wall"
    gpu = "peak_gpu" in rat
    lines = [f"{'mode':<26}{'s/step (' + metric + ')':>16}{'min':>9}{'tokens/s':>10}{'cpu s':>9}"
             f"{'peak RSS MiB':>14}{'GPU MiB' if gpu else 'util cores':>12}{'others':>8}{'quiet':>8}"]
    for v, r in res.items():
        shared = r["worker"] in ("infer", "embedded")
        mem = f"{r['peak_rss_mib']:.0f}" if not shared else "(shared)"
        col = (f"{r['peak_gpu_mib']:.0f}" if not shared else "(shared)") if gpu else f"{r['util_cores']:.2f}"
        lines.append(f"{v:<26}{r['step_s']:>16.3f}{r['step_s_min']:>9.3f}{r['tokens_per_s']:>10.0f}{r['cpu_s']:>9.3f}"
                     f"{mem:>14}{col:>12}{r['others_cores']:>8.2f}{r['steps_quiet']:>5}/{r['steps_total']}")
    lines.append("")
    lines.append("ratios (step time): " + "  ".join(f"{k} {v:.3f}" for k, v in rat["time"].items()))
    lines.append("  per-round, median: " + "  ".join(f"{k} {v:.3f}" for k, v in rat["time_paired"].items()))
    lines.append("ratios (peak RSS):  " + "  ".join(f"{k} {v:.3f}" for k, v in rat["peak_rss"].items()))
    if gpu:
        lines.append("ratios (peak GPU):  " + "  ".join(f"{k} {v:.3f}" for k, v in rat["peak_gpu"].items()))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Returns p with the benchmark's options added (shared by this script and `lorakit bench`)."""
    p.add_argument("--small", action="store_true", help="a tiny model for a quick check (= --preset small)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model and batch shape: full (the issue's 168M Llama, default), small, 1b (Llama-3.2-1B "
                        "shape, for a GPU)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda / cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights and compute dtype (float32 on CPU: this CPU class has no fast bf16)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated subset of {','.join(ALL_MODES)} (default {','.join(DEFAULT_MODES)})")
    for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "batch", "seq", "steps", "warmup"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help="override the preset")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-other", type=float, default=machine.MAX_OTHER, help="cores other processes may use in a quiet step")
    p.add_argument("--min-util", type=float, default=machine.MIN_UTIL, help="fraction of --threads a quiet step must get")
    p.add_argument("--retries", type=int, default=2, help="retries of a noisy step")
    p.add_argument("--retry-wait", type=float, default=3.0, help="seconds to pause before retrying a noisy step")
    p.add_argument("--max-wait", type=float, default=20.0,
                   help="seconds to wait for an idle machine before each step (0: never check)")
    p.add_argument("--metric", choices=("wall", "cpu"), default="wall",
                   help="what the medians and ratios use: wall time (default), or this process's CPU time "
                        "(a proxy for work when the machine is shared; use with --threads 1)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else ran)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def finish(a: argparse.Namespace, p: argparse.ArgumentParser) -> argparse.Namespace:
    """Returns the parsed options with the preset filled in and the modes checked."""
    preset = PRESETS["small" if a.small else (a.preset or "full")]
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if on_cuda(a.device):
        import torch
        if not torch.cuda.is_available():
            p.error(f"--device {a.device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in ALL_MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {ALL_MODES}")
    return a


def parse(argv=None) -> argparse.Namespace:
    p = add_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    return finish(p.parse_args(argv), p)


def worker_argv(a) -> list[str]:
    keys = ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "batch", "seq", "warmup", "rank",
            "alpha", "threads", "device", "dtype")
    return [x for k in keys if getattr(a, k) is not None for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]


def main(argv=None, args: argparse.Namespace | None = None) -> int:
    """Runs the benchmark (or one worker) from argv or already parsed args; returns the exit status."""
    a = parse(argv) if args is None else args
    if a.worker:
        worker(a)
        return 0
    import torch
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    load_before = machine.machine_load(2.0)
    log(f"machine load before: {load_before:.2f} cores busy of {os.cpu_count()}")
    started = datetime.datetime.now().astimezone()
    report = measure(a, worker_argv(a), log)
    report["ratios"] = ratios(report["results"])
    versions = {"torch": torch.__version__}
    for mod in ("transformers", "peft"):
        try:  # the installed version, without importing the package (peft would import bitsandbytes here)
            versions[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            pass
    report["meta"] = {
        "date": started.isoformat(timespec="seconds"), "wall_s": (datetime.datetime.now().astimezone()
                                                                  - started).total_seconds(),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(a.device) if on_cuda(a.device) else None,
                    "load_before_cores": load_before, "loadavg_after": os.getloadavg()},
        "versions": versions, "note": a.note,
        "config": {k: getattr(a, k) for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab", "batch",
                                              "seq", "rank", "alpha", "threads", "steps", "warmup", "modes", "metric",
                                              "max_other", "min_util", "device", "dtype")},
    }
    print(table(report))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
        log(f"wrote {a.out}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
