"""`lorakit plan`: the predicted peak memory of a run, broken down, from config.json alone."""
from __future__ import annotations

import argparse
import json

from lorakit.errors import ConfigError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plan", help="predict a run's peak memory from config.json alone and say whether it fits",
        description="Predicts the peak memory of a LoRA/QLoRA training run (frozen weights by dtype, LoRA weights, "
                    "gradients, AdamW state, activations with and without gradient checkpointing, the loss head, "
                    "the dequantization workspace, the loading peak) from the model's config.json alone: no "
                    "weights are needed. Says whether it fits and the largest batch x sequence length that does.")
    p.add_argument("--model", required=True, metavar="M",
                   help="a model folder (only config.json is read) or a config.json file")
    p.add_argument("--quantize", choices=["none", "nf4", "nf4-gptq"], default="none",
                   help="frozen base: none (default) or NF4 with double quantization")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="storage/compute dtype (default auto: config.json's torch_dtype, as the loader keeps it)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="LoRA targets (default all-linear: q,k,v,o,gate,up,down)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--max-seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 24GiB (default: this machine's MemAvailable, or the GPU's total "
                        "memory with --device cuda)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from lorakit.loading.plan import plan_memory
    if args.r < 1 or args.batch_size < 1 or args.max_seq_len < 1:
        raise ConfigError("--r, --batch-size and --max-seq-len must be >= 1")
    plan = plan_memory(args.model, quantize=None if args.quantize == "none" else args.quantize,
                       dtype=None if args.dtype == "auto" else args.dtype, r=args.r,
                       target_modules=args.target_modules, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                       gradient_checkpointing=args.gradient_checkpointing, device=args.device, memory=args.memory,
                       model_name=args.model)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0
