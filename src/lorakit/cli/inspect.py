"""`lorakit inspect ADAPTER_DIR`: what an adapter holds, how big it is, and whether it looks trained."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit.io import WEIGHTS_NAME, read_adapter, read_metadata
from lorakit.analysis.spectrum import group_factors


def adapter_report(directory: str | Path, allow_pickle: bool = False) -> dict:
    """Returns a dict describing the adapter: config, modules with ranks, counts, sizes and problems."""
    config, tensors = read_adapter(directory, allow_pickle=allow_pickle)
    meta = read_metadata(directory)
    base = json.loads(meta["lorakit.base_model"]) if "lorakit.base_model" in meta else {}
    modules = {}
    for name, (A, B) in group_factors(tensors).items():
        modules[name] = {"r": int(A.shape[0]), "A": list(A.shape), "B": list(B.shape),
                         "scale": config.scale_for(name, int(A.shape[0])), "params": int(A.numel() + B.numel())}
    problems = []
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        problems.append(f"NaN/Inf values in {len(bad)} tensors, e.g. {bad[0]}")
    b_keys = [k for k in tensors if k.endswith(("lora_B.weight", "lora_embedding_A"))]
    if b_keys and all(torch.count_nonzero(tensors[k]) == 0 for k in b_keys):
        problems.append("every zero-initialised factor is still zero: the adapter is untrained (its update is 0)")
    weights = Path(directory) / WEIGHTS_NAME
    file_bytes = weights.stat().st_size if weights.exists() else None
    params = sum(t.numel() for t in tensors.values())
    report = {
        "directory": str(directory),
        "config": config.to_peft_dict(),
        "modules": modules,
        "num_modules": len(modules),
        "ranks": sorted({m["r"] for m in modules.values()}),
        "parameters": int(params),
        "file_bytes": file_bytes,
        "base_model": base,
        "problems": problems,
    }
    if base.get("base_parameters"):
        report["base_parameters"] = base["base_parameters"]
        report["parameter_ratio"] = params / base["base_parameters"]
        if file_bytes:
            # the base model's size as fp32 safetensors (what it occupies loaded for training here)
            report["size_ratio_vs_fp32_base"] = file_bytes / (4 * base["base_parameters"])
    return report


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    cfg = report["config"]
    console.print(f"[bold]{report['directory']}[/bold]  (PEFT LoRA adapter)")
    console.print(f"r={cfg['r']}  lora_alpha={cfg['lora_alpha']}  dropout={cfg['lora_dropout']}  "
                  f"rslora={cfg['use_rslora']}  dora={cfg['use_dora']}  bias={cfg['bias']}  "
                  f"target_modules={cfg['target_modules']}  modules_to_save={cfg['modules_to_save']}")
    if cfg.get("rank_pattern"):
        console.print(f"rank_pattern={cfg['rank_pattern']}")
    base = report["base_model"]
    if base or cfg.get("base_model_name_or_path"):
        console.print(f"base model: {base.get('name_or_path') or cfg.get('base_model_name_or_path')} "
                      f"({base.get('architecture', '?')}, {base.get('base_parameters', 0):,} parameters)")
    table = Table(title=f"{report['num_modules']} adapted modules")
    for col in ("module", "r", "scale", "A", "B", "params"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for name, m in report["modules"].items():
        table.add_row(name, str(m["r"]), f"{m['scale']:g}", "x".join(map(str, m["A"])), "x".join(map(str, m["B"])),
                      f"{m['params']:,}")
    console.print(table)
    size = report["file_bytes"]
    line = f"adapter: {report['parameters']:,} parameters, {size / 1e6:.3f} MB on disk" if size else \
        f"adapter: {report['parameters']:,} parameters"
    if "parameter_ratio" in report:
        line += (f"; {100 * report['parameter_ratio']:.3f}% of the base model's parameters"
                 + (f", {100 * report['size_ratio_vs_fp32_base']:.3f}% of its fp32 size" if size else ""))
    console.print(line)
    for p in report["problems"]:
        console.print(f"[bold red]problem:[/bold red] {p}")
    if not report["problems"]:
        console.print("[green]no problems found[/green] (finite values, non-zero update)")


def run(args) -> int:
    """Prints the adapter report (or JSON); returns 0, or 1 when problems were found."""
    report = adapter_report(args.adapter_dir, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print(report)
    return 1 if report["problems"] and args.strict else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show what an adapter folder holds and flag problems",
                              description="Print an adapter's config, adapted modules and ranks, parameter counts, "
                                          "file size and size ratio to its base model, and flag problems "
                                          "(NaN/Inf values, an untrained all-zero update).")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when a problem is found")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read a pickle adapter_model.bin (torch.load weights_only=True); off by default")
    p.set_defaults(func=run)
