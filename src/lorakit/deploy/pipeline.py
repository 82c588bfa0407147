"""`lorakit export` end to end: merged or adapter-only GGUF, an optional llama.cpp quantization, a Modelfile.

Every check that can fail (output path, architecture, adapter/base match, adapter kind, disk space, quantizer
present) runs before the first byte is written; each file is written under a temporary name and renamed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from lorakit.deploy import llama_cpp, ollama
from lorakit.deploy.gguf import export_adapter_gguf, export_gguf
from lorakit.deploy.output import check_output_file
from lorakit.deploy.sources import base_folder, resolve_adapter, run_settings
from lorakit.errors import LorakitError


def export(base: str | None, adapter: str | None, out: str | Path, outtype: str | None = None,
           adapter_only: bool = False, quantize: str | None = None, ollama_dir: str | Path | None = None,
           force: bool = False, allow_pickle: bool = False, log: Callable[[str], None] = print) -> dict:
    """Runs an export; returns {"gguf": path, "base_gguf": path|None, "modelfile": path|None}."""
    out = check_output_file(out, force)
    if quantize:
        quantize = llama_cpp.check_quant_type(quantize)
        if adapter_only:
            raise LorakitError("--quantize applies to a model, not to --adapter-only (use --outtype f16/q8_0 for adapters).")
    if adapter_only and not adapter:
        raise LorakitError("--adapter-only needs --adapter.")
    run = run_settings(resolve_adapter(adapter)) if adapter else {}
    if base is None and run.get("model"):
        base = run["model"]
        log(f"base model from the run's config.yaml: {base}")
    result = {"gguf": None, "base_gguf": None, "modelfile": None}
    base_gguf = None
    if adapter_only:
        result["gguf"] = export_adapter_gguf(base, adapter, out, outtype or "f16", force, allow_pickle, log)
        if ollama_dir is not None:   # Ollama needs the base as GGUF too: FROM base, ADAPTER lora
            base_gguf = out.with_name(out.stem + "-base.gguf")
            if not base_gguf.exists() or force:
                export_gguf(base, None, base_gguf, outtype or "f16", force=True, log=log)
            result["base_gguf"] = base_gguf
    elif quantize:
        with tempfile.TemporaryDirectory(prefix=".lorakit-export-", dir=out.parent if out.parent.exists() else None) as d:
            src = Path(d) / "unquantized.gguf"
            export_gguf(base, adapter, src, outtype or "f16", True, allow_pickle, log=log)
            llama_cpp.quantize_gguf(src, out, quantize)
        log(f"quantized with llama.cpp to {quantize}: {out} ({out.stat().st_size / 1e6:.0f} MB)")
        result["gguf"] = out
    else:
        result["gguf"] = export_gguf(base, adapter, out, outtype or "f16", force, allow_pickle, log=log)
    if ollama_dir is not None:
        import gguf
        from transformers import AutoTokenizer
        folder = base_folder(base)
        special = gguf.SpecialVocab(folder)
        eos = AutoTokenizer.from_pretrained(folder).eos_token
        template = special.chat_template if isinstance(special.chat_template, str) else None
        model = base_gguf if adapter_only else result["gguf"]
        result["modelfile"] = ollama.write_modelfile(ollama_dir, model, result["gguf"] if adapter_only else None,
                                                     template, run, eos, log)
    return result
