"""Shared-input fusion on the embedded SmolLM2 (GQA: k,v 576 -> 192): fused vs unfused LoRA training steps.

Both models are built from the same base in one process and stepped alternately (forward + backward of the
recipe's loss on the default training data, batch 8), so load drifts hit both alike; prints median step
times and their ratio. Measured 2026-11-22, 2 threads, quiet machine: 1.621 vs 1.610 s (1.007x).

    python bench/fuse_embedded.py
"""
from __future__ import annotations

import copy
import statistics
import time

import torch


def main(rounds: int = 3, batch: int = 8, rows: int = 64) -> float:
    """Returns median fused step time / median unfused step time (first `rows // batch` steps are warm-up)."""
    import lorakit
    from lorakit.models import load_model
    from lorakit.train.data import collate, embedded_dataset, tokenize_records
    from lorakit.train.step import loss_sum

    torch.set_num_threads(2)
    base, tok = load_model("default")
    ex, _ = tokenize_records(embedded_dataset()["train"][:rows], tok, template="auto", max_seq_len=256)
    batches = [collate(ex[i:i + batch], tok.pad_token_id or 0) for i in range(0, rows, batch)]
    models = {}
    for name in ("fused", "unfused"):
        m = copy.deepcopy(base)
        torch.manual_seed(0)
        lorakit.inject(m, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        if name == "unfused":
            lorakit.unfuse(m)
        models[name] = m.train()
    times = {k: [] for k in models}
    for _ in range(rounds):
        for b in batches:
            for k, m in models.items():
                t = time.perf_counter()
                loss, n = loss_sum(m, b)
                (loss / n).backward()
                m.zero_grad(set_to_none=True)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v[len(batches):]) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:8s} median step {v:.4f} s")
    ratio = med["fused"] / med["unfused"]
    print(f"fused/unfused {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
