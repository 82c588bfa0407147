"""LoRA on a Qwen3-MoE-shaped model (8 experts, top-2, routed experts adapted): lorakit vs PEFT, one run.

    python bench/moe.py                         # CPU, the default shape (~2 minutes on a quiet 2-core machine)
    python bench/moe.py --small --rounds 3      # a quick check
    python bench/moe.py --device cuda --dtype bfloat16 --batch 8 --seq 512
    python bench/moe.py --out bench/results/moe.json

One worker process per mode builds the same random-init model (same seed) with the same LoRA (r=16 on
q,k,v,o and on every expert's gate_up_proj and down_proj through target_parameters), warms up, then runs one
AdamW training step each time the parent asks; the parent alternates the modes (interleaved rounds), so a busy
spell on the shared machine hits every mode alike. Reported per mode: median step time, peak memory (CPU: the
worker's peak RSS and its growth over the idle model; CUDA: torch.cuda.max_memory_allocated), and the ratios to
PEFT (median of per-round ratios). The machine's load average before and after is recorded.

Modes:
    lorakit        lorakit.inject(LoraConfig(target_modules=[...], target_parameters=[...])): the experts run the
                   grouped LoRA forward (lorakit.layers.experts: base and low-rank products per expert group)
    lorakit-weight the same with the effective-weight path (W + s·B·A handed to the module's own forward,
                   recomputed for backward), what lorakit uses for experts modules the grouped path does not know
    peft           peft.get_peft_model with the same config
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ["lorakit", "peft", "lorakit-weight"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def build(a):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(hidden_size=a.hidden, intermediate_size=a.hidden * 2, moe_intermediate_size=a.expert_dim,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads // 2,
                         head_dim=a.hidden // a.heads, vocab_size=a.vocab, num_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=max(a.seq, 64), output_router_logits=False)
    model = Qwen3MoeForCausalLM(cfg)
    return model.to(device=a.device, dtype=getattr(torch, a.dtype))


def adapt(model, mode, a):
    if mode.startswith("lorakit"):
        import lorakit
        from lorakit.layers.param import LoraParam
        LoraParam.use_grouped = mode != "lorakit-weight"
        return lorakit.inject(model, lorakit.LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=ATTN,
                                                        target_parameters=EXPERTS))
    import peft
    return peft.get_peft_model(model, peft.LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=ATTN,
                                                      target_parameters=EXPERTS))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(a) -> None:
    import torch
    import lorakit  # noqa: F401  (both workers import both libraries: same import footprint)
    import peft  # noqa: F401
    torch.set_num_threads(a.threads)
    model = adapt(build(a), a.mode, a).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g).to(a.device)
    cuda = a.device.startswith("cuda")

    def step():
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, float(loss.detach())

    idle = rss_mib()
    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    print(json.dumps({"ready": True, "trainable": sum(p.numel() for p in params)}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        seconds, loss = step()
        out = {"seconds": seconds, "loss": loss,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "idle_rss_mib": idle}
        if cuda:
            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(out), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--expert-dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--small", action="store_true", help="hidden 128, 2 layers, batch 2 x 64")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # worker
    a = p.parse_args(argv)
    if a.small:
        a.hidden, a.expert_dim, a.layers, a.heads, a.vocab, a.batch, a.seq = 128, 128, 2, 4, 2000, 2, 64
    if a.mode:
        worker(a)
        return 0
    modes = a.modes.split(",")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    procs = {}
    for m in modes:
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", m, "--hidden", str(a.hidden), "--expert-dim",
               str(a.expert_dim), "--layers", str(a.layers), "--heads", str(a.heads), "--vocab", str(a.vocab),
               "--batch", str(a.batch), "--seq", str(a.seq), "--r", str(a.r), "--warmup", str(a.warmup),
               "--threads", str(a.threads), "--device", a.device, "--dtype", a.dtype]
        procs[m] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    load_before = os.getloadavg()
    info = {m: json.loads(procs[m].stdout.readline()) for m in modes}
    steps = {m: [] for m in modes}
    for rnd in range(a.rounds):
        order = modes if rnd % 2 == 0 else modes[::-1]
        for m in order:
            procs[m].stdin.write("step\n")
            procs[m].stdin.flush()
            steps[m].append(json.loads(procs[m].stdout.readline()))
    for m in modes:
        procs[m].stdin.close()
        procs[m].wait()
    load_after = os.getloadavg()
    report = {"shape": {k: getattr(a, k) for k in ("hidden", "expert_dim", "layers", "heads", "vocab", "batch", "seq",
                                                  "r", "rounds", "threads", "device", "dtype")},
              "experts": 8, "top_k": 2, "loadavg_before": load_before, "loadavg_after": load_after,
              "cores": os.cpu_count(), "modes": {}}
    for m in modes:
        s = steps[m]
        row = {"trainable": info[m]["trainable"], "median_step_s": statistics.median(x["seconds"] for x in s),
               "steps_s": [round(x["seconds"], 4) for x in s], "loss_last": s[-1]["loss"],
               "peak_rss_mib": max(x["peak_rss_mib"] for x in s), "idle_rss_mib": s[0]["idle_rss_mib"]}
        row["rss_growth_mib"] = row["peak_rss_mib"] - row["idle_rss_mib"]
        if "peak_gpu_mib" in s[-1]:
            row["peak_gpu_mib"] = max(x["peak_gpu_mib"] for x in s)
        report["modes"][m] = row
    if "peft" in modes:
        base = steps["peft"]
        for m in modes:
            per_round = [x["seconds"] / y["seconds"] for x, y in zip(steps[m], base)]
            row = report["modes"][m]
            row["step_ratio_vs_peft"] = statistics.median(per_round)
            mem = "peak_gpu_mib" if "peak_gpu_mib" in row else "rss_growth_mib"
            row["memory_ratio_vs_peft"] = row[mem] / max(report["modes"]["peft"][mem], 1e-9)
    print(f"Qwen3-MoE shape {report['shape']} | load before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({report['cores']} cores)")
    mem_col = "peak GPU MiB" if a.device.startswith("cuda") else "RSS growth MiB"
    print(f"{'mode':<14} {'trainable':>10} {'median step s':>14} {'x PEFT':>7} {mem_col:>15} {'x PEFT':>7} {'peak RSS MiB':>13}")
    for m, row in report["modes"].items():
        mem = row.get("peak_gpu_mib", row["rss_growth_mib"])
        print(f"{m:<14} {row['trainable']:>10,} {row['median_step_s']:>14.4f} {row.get('step_ratio_vs_peft', 0):>7.3f} "
              f"{mem:>15.1f} {row.get('memory_ratio_vs_peft', 0):>7.3f} {row['peak_rss_mib']:>13.1f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
