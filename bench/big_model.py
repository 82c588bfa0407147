"""Real-size models on a small machine: the memory plan vs the measured peak, lorakit vs PEFT, one run.

    python bench/big_model.py                       # 3B + 8B shapes (8B only with >= 18 GiB MemAvailable)
    python bench/big_model.py --shapes 1b 3b        # what to run; --steps 3 --batch 1 --seq 256 by default
    python bench/big_model.py --shapes tiny --out /tmp/b.json     # seconds: the smoke test

Checkpoints are written once into ${LORAKIT_CACHE:-~/.cache/lorakit}/synthetic/<shape>: random bf16 weights in
~5 GB safetensors shards + index, the embedded SmolLM2 tokenizer, vocab_size 49152 to match it (written shard
by shard: never the whole model in memory). Every configuration runs in its own subprocess; its peak private
memory is the largest RssAnon (/proc/PID/status) a watcher thread in the parent sees while it runs:

    lorakit-qlora   lorakit.loading.load_pretrained_streaming(quantize="nf4", dtype=float32 on CPU: lorakit's
                    default compute there) + lorakit.inject (r=16, all-linear) + enable_gradient_checkpointing +
                    AdamW, loss = lorakit's training loss (chunked head), allocator as `lorakit train --quantize`
                    sets it (lorakit.loading.allocator). NF4 linears dequantize into one reused fp32 buffer (the
                    fused path); the bf16 embedding and head stay bf16, memory-mapped, upcast where used.
    peft-qlora      transformers from_pretrained(BitsAndBytesConfig(nf4, double quant, bf16 compute)) + PEFT
                    LoraConfig(r=16, all-linear) + gradient checkpointing + AdamW, the model's own loss
    lorakit-qlora-bf16  as lorakit-qlora computing in bf16 (--dtype bfloat16), as PEFT does
    lorakit-bf16    as lorakit-qlora without quantization (bf16 weights and LoRA), on the 3B shape
    lorakit-merge   `lorakit merge` (lorakit.deploy.sharded_merge.merge_sharded) of a random r=16 all-linear adapter
                    into the checkpoint, written in its dtype and sharding; compared with its largest shard + 1 GiB
    lorakit-train   the user's path: lorakit.train.recipe.train (`lorakit train --quantize nf4 --gradient-checkpointing
                    --packing` with the default --dtype auto, memory plan before loading, load_base), s/step from
                    the recipe

Results: bench/results/big_model.json and a markdown table (bench/results/big_model.md).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {  # Llama-3.1 8B / Llama-3.2 3B / 1B shapes with SmolLM2's 49152-token vocabulary
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
}
VOCAB = 49152
ALL_RUNS = ["lorakit-qlora", "lorakit-train", "lorakit-qlora-bf16", "peft-qlora", "lorakit-bf16", "lorakit-merge"]
RUNS = {"8b": ["lorakit-qlora", "lorakit-train", "peft-qlora", "lorakit-merge", "lorakit-qlora-bf16"], "3b": ALL_RUNS, "1b": ALL_RUNS, "tiny": ALL_RUNS}


def cache_folder() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit").expanduser() / "synthetic"


def ensure_checkpoint(shape: str) -> Path:
    """Returns the synthetic checkpoint folder of `shape`, writing it first if it is not there."""
    import torch
    from transformers import LlamaConfig

    from lorakit.loading.synthetic import write_synthetic_checkpoint
    from lorakit.loading.pretrained import cached_gguf_folder, embedded_model_path

    folder = cache_folder() / f"llama-{shape}-bf16"
    if (folder / "model.safetensors.index.json").exists():
        return folder
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1,
                      eos_token_id=2, **SHAPES[shape])
    print(f"writing the synthetic {shape} checkpoint to {folder} (once)", flush=True)
    return write_synthetic_checkpoint(cfg, folder, dtype=torch.bfloat16, shard_bytes=5 * 10 ** 9 if shape != "tiny"
                                      else 2 * 10 ** 6, tokenizer_from=cached_gguf_folder(embedded_model_path()))


def ensure_adapter(folder: Path, r: int = 16) -> Path:
    """Returns a random r-rank all-linear PEFT adapter for the checkpoint in `folder` (written once, fp32)."""
    import torch
    from safetensors.torch import save_file
    cfg = json.loads((folder / "config.json").read_text())
    out = folder.parent / f"{folder.name}-adapter-r{r}"
    if (out / "adapter_model.safetensors").exists():
        return out
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(n):
        for name, (k, d) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, k, generator=g) / k ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(d, r, generator=g) * 1e-3
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none",
        target_modules=sorted(n.split(".")[-1] for n in shapes), base_model_name_or_path=str(folder),
        fan_in_fan_out=False, use_rslora=False), indent=2))
    return out


def merge_worker(folder: str, r: int) -> dict:
    import tempfile

    from lorakit.deploy.sharded_merge import merge_sharded
    from lorakit.loading.memwatch import rss_anon
    adapter = ensure_adapter(Path(folder), r)
    base = rss_anon()
    with tempfile.TemporaryDirectory(dir=Path(folder).parent) as tmp:
        t = time.perf_counter()
        merge_sharded(folder, str(adapter), Path(tmp) / "merged", log=lambda m: None)
        took = time.perf_counter() - t
    shard = max(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    return {"mode": "lorakit-merge", "load_s": 0.0, "step_s": [round(took, 2)], "runtime_bytes": base,
            "after_load_bytes": base, "loss": None, "largest_shard_bytes": shard}


def lorakit_dtype(mode: str, dtype: str | None) -> str | None:
    """The dtype a lorakit run loads with: --dtype when given, bf16 compute for *-bf16 runs, else lorakit's
    default on this CPU (`--dtype auto` = float32; lorakit.train.prepare.resolve_dtype)."""
    if dtype:
        return dtype
    if mode.endswith("bf16"):
        return "bfloat16"
    from lorakit.train.prepare import resolve_dtype
    return resolve_dtype("auto", "cpu")


# ============================================================================ worker: one configuration
def worker(mode: str, folder: str, steps: int, batch: int, seq: int, r: int, gc: bool = True,
           dtype: str | None = None) -> dict:
    import torch

    from lorakit.loading.memwatch import rss_anon
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if mode == "lorakit-train":
        return train_worker(folder, steps, batch, seq, r, gc, dtype)
    if mode == "lorakit-merge":
        return merge_worker(folder, r)
    if mode.startswith("lorakit"):
        import lorakit
        from lorakit.loading import load_pretrained_streaming
        from lorakit.train.loop import loss_sum
        base = rss_anon()
        if "qlora" in mode:  # what `lorakit train --quantize` does (lorakit.train.prepare.load_base)
            from lorakit.loading.allocator import return_freed_memory_promptly
            return_freed_memory_promptly()
        model, _ = load_pretrained_streaming(folder, quantize="nf4" if "qlora" in mode else None,
                                             dtype=lorakit_dtype(mode, dtype))
        loaded = time.perf_counter()
        after_load = rss_anon()
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        if gc:
            lorakit.enable_gradient_checkpointing(model)

        def step_loss(b):
            loss, n = loss_sum(model, b)
            return loss / n
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        base = rss_anon()
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map="cpu")
        loaded = time.perf_counter()
        after_load = rss_anon()
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

        def step_loss(b):
            return model(**b, use_cache=False).loss
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq))
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = step_loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"mode": mode, "load_s": round(loaded - t0, 2), "step_s": [round(x, 2) for x in times],
            "runtime_bytes": base, "after_load_bytes": after_load, "loss": float(loss)}


def train_worker(folder: str, steps: int, batch: int, seq: int, r: int, gc: bool, dtype: str | None) -> dict:
    """`lorakit train --quantize nf4` through the recipe (lorakit.train.recipe.train): the user's path, with
    the memory plan before loading, load_base's streaming loader, packed batch x seq blocks of the embedded data."""
    import tempfile

    from lorakit.loading.memwatch import rss_anon
    from lorakit.train.hooks import Hooks
    from lorakit.train.options import load_options
    from lorakit.train.recipe import train
    t0 = time.perf_counter()
    seen = {"runtime_bytes": rss_anon(), "step_s": []}

    class Timer(Hooks):
        def on_train_start(self, run) -> None:
            seen["loaded"], seen["after_load_bytes"] = time.perf_counter(), rss_anon()

        def on_step_end(self, run, result) -> None:
            seen["step_s"].append(round(run.step_seconds, 2))
            seen["loss"] = float(result.loss)

    with tempfile.TemporaryDirectory() as out:
        o = load_options(base=dict(model=folder, out=out, quantize="nf4", gradient_checkpointing=gc,
                                   dtype=dtype or "auto", r=r, lora_alpha=2 * r, batch_size=batch,
                                   max_seq_len=seq, packing=True, max_steps=steps, warmup_steps=0, eval_every=0,
                                   save_every=0, eval_limit=1, baseline_eval=False, accuracy=False, progress=False,
                                   device="cpu"))
        train(o, hooks=[Timer()])
    return {"mode": "lorakit-train", "load_s": round(seen.get("loaded", t0) - t0, 2), "step_s": seen["step_s"],
            "runtime_bytes": seen["runtime_bytes"], "after_load_bytes": seen.get("after_load_bytes", 0),
            "loss": seen.get("loss")}


# ============================================================================ parent
def measure(mode: str, folder: Path, args) -> dict:
    from lorakit.loading.memwatch import run_measured
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    argv = [sys.executable, __file__, "--worker", mode, "--folder", str(folder), "--steps", str(args.steps),
            "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r)] + (["--no-gc"] if args.no_gc else []) + (
        ["--dtype", args.dtype] if args.dtype and mode.startswith("lorakit") else [])
    t = time.perf_counter()
    rc, peak, out, err = run_measured(argv, env=env, interval=0.02)
    wall = time.perf_counter() - t
    if rc != 0:
        return {"mode": mode, "error": (err or out)[-2000:], "peak_bytes": peak, "wall_s": round(wall, 1)}
    res = json.loads(out.strip().splitlines()[-1])
    res.update(peak_bytes=peak, wall_s=round(wall, 1))
    steps = res["step_s"][1:] or res["step_s"]  # the first step also warms up kernels and the allocator
    res["s_per_step"] = round(sum(steps) / len(steps), 2)
    return res


def plan_for(mode: str, folder: Path, args) -> dict:
    from lorakit.loading.plan import plan_memory
    p = plan_memory(folder, quantize="nf4" if ("qlora" in mode or mode == "lorakit-train") else None, r=args.r,
                    batch_size=args.batch, max_seq_len=args.seq, gradient_checkpointing=not args.no_gc,
                    memory=2 ** 50, dtype=lorakit_dtype(mode, args.dtype))
    return {"plan_peak_bytes": p.peak, "plan_loading_bytes": p.loading_peak, "plan_training_bytes": p.training_peak,
            "plan_text": str(p)}


def markdown(results: dict) -> str:
    g = 2 ** 30
    rows = ["| shape | run | plan GiB | measured peak GiB (RssAnon) | plan/measured | load s | s/step |",
            "|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        if "error" in r:
            rows.append(f"| {r['shape']} | {r['mode']} | | failed: {r['error'].splitlines()[-1][:80]} | | | |")
            continue
        planned = "plan_peak_bytes" in r
        plan = f"{r['plan_peak_bytes'] / g:.2f}" if planned else "—"
        ratio = f"{r['plan_peak_bytes'] / r['peak_bytes']:.3f}" if planned else "—"
        rows.append(f"| {r['shape']} | {r['mode']} | {plan} | {r['peak_bytes'] / g:.2f} | {ratio} | "
                    f"{r['load_s']} | {r['s_per_step']} |")
    for shape, c in results.get("comparisons", {}).items():
        if "peak_vs_shard_plus_1GiB" in c:
            rows.append(f"\n{shape}: {c['merge_s']} s, peak / (largest shard + 1 GiB) {c['peak_vs_shard_plus_1GiB']:.3f}")
        else:
            rows.append(f"\n{shape} vs peft-qlora: peak {c['peak_ratio']:.3f}, s/step {c['step_ratio']:.3f}")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None,
                    help="checkpoint shapes to run (default: 3b, and 8b when >= 18 GiB is available)")
    ap.add_argument("--runs", nargs="+", default=None, help="only these runs (" + ", ".join(ALL_RUNS) + ")")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default=None, help="lorakit runs' dtype (default: lorakit's own, float32 compute on CPU; bfloat16 for *-bf16 runs)")
    ap.add_argument("--no-gc", action="store_true", help="without gradient checkpointing")
    ap.add_argument("--folder", help="measure this checkpoint folder instead of the synthetic shapes")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(HERE / "results" / "big_model.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.steps, args.batch, args.seq, args.r, not args.no_gc,
                                args.dtype)))
        return 0
    from lorakit.loading.plan import available_memory
    shapes = args.shapes or (["3b", "8b"] if available_memory() >= 18 * 2 ** 30 else ["3b", "1b"])
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.machine()} {os.cpu_count()} cores, MemAvailable "
                          f"{available_memory() / 2 ** 30:.1f} GiB",
               "command": "python bench/big_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": dict(steps=args.steps, batch=args.batch, seq=args.seq, r=args.r, threads=args.threads,
                                gradient_checkpointing=not args.no_gc, dtype=args.dtype or "lorakit's default"),
               "runs": [], "comparisons": {}}
    for shape in ([Path(args.folder).name] if args.folder else shapes):
        folder = Path(args.folder) if args.folder else ensure_checkpoint(shape)
        for mode in RUNS.get(shape, RUNS["tiny"]):
            if args.runs and mode not in args.runs:
                continue
            print(f"{shape} {mode} ...", flush=True)
            if mode == "lorakit-merge":
                ensure_adapter(folder, args.r)  # written before the measured process starts
            res = measure(mode, folder, args)
            res["shape"] = shape
            if mode == "lorakit-merge" and "error" not in res:
                limit = res["largest_shard_bytes"] + 2 ** 30
                results["comparisons"][f"{shape} lorakit-merge"] = {
                    "peak_vs_shard_plus_1GiB": round(res["peak_bytes"] / limit, 3), "merge_s": res["step_s"][0]}
            if mode.startswith("lorakit") and mode != "lorakit-merge":
                res.update(plan_for(mode, folder, args))
            results["runs"].append(res)
            print(f"  peak {res['peak_bytes'] / 2 ** 30:.2f} GiB" + (f", {res['s_per_step']} s/step"
                                                                     if "s_per_step" in res else " FAILED"), flush=True)
        by = {r["mode"]: r for r in results["runs"] if r["shape"] == shape and "error" not in r}
        for mine in ("lorakit-qlora", "lorakit-qlora-bf16", "lorakit-train"):
            if mine in by and "peft-qlora" in by:
                a, b = by[mine], by["peft-qlora"]
                results["comparisons"][f"{shape} {mine}"] = {
                    "peak_ratio": round(a["peak_bytes"] / b["peak_bytes"], 3),
                    "step_ratio": round(a["s_per_step"] / b["s_per_step"], 3)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
