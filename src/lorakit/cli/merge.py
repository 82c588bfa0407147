"""`lorakit merge --base MODEL --adapter DIR --out DIR`: a plain transformers folder with the adapter folded in."""
from __future__ import annotations

import shutil
from pathlib import Path

from lorakit.errors import LorakitError


def merge_to_folder(base: str | None, adapter: str, out: str, dtype: str = "float32", allow_pickle: bool = False,
                    trust_remote_code: bool = False, log=print, quantize: str = "none") -> Path:
    """Loads base + adapter, merges, and writes a safetensors model folder atomically; returns its path.

    quantize="nf4": the adapter is merged into the NF4-rounded base it was trained on with QLoRA (dequantized,
    then W0 + s·B·A in fp32), instead of into the original full-precision weights.
    """
    import torch

    import lorakit
    from lorakit.io import atomic_write_dir, check_output_dir
    from lorakit.loading.pretrained import load_model

    check_output_dir(out)  # before the expensive part: a bad --out fails at once
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model, tokenizer = load_model(base, dtype=torch.float32, trust_remote_code=trust_remote_code)
    from lorakit.model.merge import merge_and_unload_quantized
    if quantize == "nf4":
        lorakit.quantize(model)
    lorakit.load_adapter(model, adapter, allow_pickle=allow_pickle)
    unload = merge_and_unload_quantized if quantize == "nf4" else lorakit.merge_and_unload
    merged = unload(model).to(torch_dtype)
    need = sum(p.numel() * p.element_size() for p in merged.parameters()) * 1.05 + (50 << 20)
    out_path = Path(out)
    probe = out_path.parent if out_path.parent.exists() else Path(".")
    free = shutil.disk_usage(probe.resolve()).free
    if free < need:
        raise LorakitError(f"not enough free disk space in {probe.resolve()}: the merged model needs about "
                           f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free. Free some space or choose --out elsewhere.")

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    path = atomic_write_dir(out_path, write)
    log(f"merged model written to {path} ({need / 1e6:.0f} MB, {dtype}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained('{path}') — lorakit is not needed")
    return path


def run(args) -> int:
    merge_to_folder(args.base, args.adapter, args.out, args.dtype, args.allow_pickle, args.trust_remote_code,
                    quantize=args.quantize)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("merge", help="fold an adapter into its base model and save a plain model folder",
                              description="Load a base model and an adapter, fold W0 + scale*B@A into the weights "
                                          "(fp32 arithmetic), and write a plain transformers folder (safetensors + "
                                          "tokenizer) that loads with AutoModelForCausalLM.from_pretrained without "
                                          "lorakit. Free disk space is checked first; the write is atomic.")
    p.add_argument("--base", default=None, help="base model: a transformers folder, a .gguf file, a hub id, or "
                                                "omit for the embedded default (smollm2)")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format)")
    p.add_argument("--out", required=True, help="output folder for the merged model (replaced atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: float32)")
    p.add_argument("--quantize", default="none", choices=["none", "nf4"],
                   help="nf4: merge into the NF4-rounded base a QLoRA adapter was trained on (written dequantized, "
                        "in --dtype); none: into the original weights (default: none)")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickle adapter_model.bin (weights_only)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model folder's own code to run")
    p.set_defaults(func=run)
