"""QLoRA quality check: LoRA vs QLoRA on the embedded SmolLM2, same data, steps and seeds; held-out accuracy.

    for seed in seeds:
        lorakit train --seed S                          (LoRA on the fp32 base)
        lorakit train --seed S --quantize nf4           (QLoRA: NF4 base, round to nearest, as the QLoRA paper)
        lorakit train --seed S --quantize nf4-gptq      (QLoRA: NF4 base, codes chosen by GPTQ on 64 training rows)
    ─► mean held-out accuracy per method, the QLoRA − LoRA gap (target: within 2 points) ─► JSON + markdown

Every run is `lorakit train`'s default job (60 steps, r=16 all-linear, lr 1e-3, 136 held-out rows), run
in-process through `lorakit.train.recipe.train`; each run folder keeps its results.json, and a run whose
folder already has one is read back instead of run again (so an interrupted check resumes). One run takes
3-6 minutes on 2 cores; the default 3 seeds x 3 methods take about 30-45 minutes.

    python bench/qlora_quality.py                                        # 3 seeds, runs under runs/qlora_quality
    python bench/qlora_quality.py --seeds 42 --methods lora nf4 --out-dir /tmp/qq    # one seed, two methods

The summary (summary.md, summary.json) is written next to the runs and copied to bench/results/ with --record.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

METHODS = {"lora": "none", "nf4": "nf4", "nf4-gptq": "nf4-gptq"}
LABELS = {"lora": "LoRA (fp32 base)", "nf4": "QLoRA, NF4 round-to-nearest", "nf4-gptq": "QLoRA, NF4 with GPTQ rounding"}
TARGET_GAP = 2.0  # points


def run_one(method: str, seed: int, out: Path) -> dict:
    """Returns the results.json of `lorakit train` for this method and seed (running it if not there yet)."""
    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    from lorakit.train.options import TrainOptions
    from lorakit.train.recipe import train
    o = TrainOptions(out=str(out), seed=seed, quantize=METHODS[method], progress=False, save_every=0)
    print(f"== {method} seed {seed} -> {out}", flush=True)
    return train(o, command=f"lorakit train --seed {seed} --quantize {METHODS[method]}")


def summarize(runs: dict) -> dict:
    """Returns per-method accuracies (before/after, per seed, mean) and each QLoRA method's gap to LoRA."""
    out = {}
    for method, by_seed in runs.items():
        after = {s: 100 * r["accuracy_after"]["accuracy"] for s, r in by_seed.items()}
        before = {s: 100 * r["accuracy_before"]["accuracy"] for s, r in by_seed.items() if r.get("accuracy_before")}
        tasks = sorted(next(iter(by_seed.values()))["accuracy_after"]["per_task"])
        out[method] = {
            "label": LABELS[method], "after": after, "mean_after": statistics.mean(after.values()),
            "sd_after": statistics.stdev(after.values()) if len(after) > 1 else 0.0,
            "mean_before": statistics.mean(before.values()) if before else None,
            "per_task_mean": {t: statistics.mean(100 * r["accuracy_after"]["per_task"][t]["accuracy"]
                                                 for r in by_seed.values()) for t in tasks},
            "train_seconds": statistics.mean(r["train_seconds"] for r in by_seed.values()),
        }
    if "lora" in out:
        for method in out:
            if method != "lora":
                seeds = sorted(set(out[method]["after"]) & set(out["lora"]["after"]))
                gap = statistics.mean(out[method]["after"][s] - out["lora"]["after"][s] for s in seeds)
                out[method]["gap_vs_lora"] = gap
                out[method]["within_target"] = gap >= -TARGET_GAP
    return out


def markdown(summary: dict, seeds: list[int], meta: dict) -> str:
    lines = [f"QLoRA quality check ({meta['date']}, `python bench/qlora_quality.py`): embedded SmolLM2-135M-Instruct, "
             f"`lorakit train` defaults (60 steps, r=16 all-linear), 136 held-out rows (1 row = 0.74 pt), "
             f"seeds {', '.join(map(str, seeds))}; per-task columns are means over seeds. Training times are in "
             f"summary.json (not comparable here: other work shared the cores).", "",
             "| method | base accuracy % (before training) | held-out accuracy % per seed | mean ± sd | gap vs LoRA | "
             + " | ".join(next(iter(summary.values()))["per_task_mean"]) + " |",
             "|---|---|---|---|---|" + "---|" * len(next(iter(summary.values()))["per_task_mean"])]
    for m, r in summary.items():
        gap = r.get("gap_vs_lora")
        gap_s = "" if gap is None else f"{gap:+.1f} pt ({'within' if r['within_target'] else 'outside'} {TARGET_GAP:g})"
        per_seed = ", ".join(f"{r['after'][s]:.1f}" for s in seeds if s in r["after"])
        lines.append(f"| {r['label']} | {r['mean_before']:.1f} | {per_seed} "
                     f"| {r['mean_after']:.1f} ± {r['sd_after']:.1f} | {gap_s} | "
                     + " | ".join(f"{v:.1f}" for v in r["per_task_mean"].values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--out-dir", default="runs/qlora_quality", help="one run folder per method and seed")
    p.add_argument("--record", action="store_true", help="also write bench/results/qlora_quality.{md,json}")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = Path(args.out_dir)
    runs = {m: {} for m in args.methods}
    for seed in args.seeds:
        for m in args.methods:
            runs[m][seed] = run_one(m, seed, root / f"{m}_s{seed}")
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "seeds": args.seeds,
            "python": sys.version.split()[0], "torch": torch.__version__}
    summary = summarize(runs)
    text = markdown(summary, args.seeds, meta)
    (root / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    (root / "summary.md").write_text(text)
    if args.record:
        results = Path(__file__).resolve().parent / "results"
        (results / "qlora_quality.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
        (results / "qlora_quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
