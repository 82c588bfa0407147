"""`lorakit export`: the model (base + adapter merged) or the adapter alone as GGUF, for llama.cpp and Ollama."""
from __future__ import annotations


def run(args) -> int:
    from lorakit.deploy.pipeline import export
    export(args.base, args.adapter, args.out, args.outtype, args.adapter_only, args.quantize, args.ollama,
           args.force, args.allow_pickle)
    return 0


def add_parser(subparsers) -> None:
    from lorakit.deploy.gguf_arch import supported
    from lorakit.deploy.llama_cpp import QUANT_TYPES
    p = subparsers.add_parser(
        "export", help="write a GGUF file for llama.cpp / Ollama (merged model, or the adapter alone)",
        description="Write the base model with the adapter folded in (or, with --adapter-only, the adapter as a "
                    f"GGUF LoRA) as one GGUF file that llama.cpp loads. Architectures: {supported()}. "
                    "Checks run before anything is written; the file appears only when complete.")
    p.add_argument("--base", default=None, help="base model: a transformers folder (safetensors), a .gguf file, or "
                                                "omit for the run's model / the embedded default (smollm2)")
    p.add_argument("--adapter", default=None, help="adapter folder, checkpoint folder or run folder (omit: base only)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--outtype", default=None, choices=["f32", "f16", "bf16", "q8_0"],
                   help="tensor type of the weights (default f16; norms and 1-D tensors stay f32)")
    p.add_argument("--adapter-only", action="store_true",
                   help="write the adapter alone as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER)")
    p.add_argument("--quantize", default=None, metavar="TYPE",
                   help=f"quantize with llama.cpp's own quantizer (needs llama-cpp-python): {', '.join(QUANT_TYPES)}")
    p.add_argument("--ollama", default=None, metavar="DIR", help="also write DIR/Modelfile for `ollama create`")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="allow a pickle adapter_model.bin (weights_only)")
    p.set_defaults(func=run)
