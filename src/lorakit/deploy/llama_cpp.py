"""llama.cpp through llama-cpp-python, when it is installed: its own quantizer (Q4_K_M, Q5_K_M, ...) and greedy
generation from a GGUF file (with a GGUF LoRA), for checking exports against lorakit.

lorakit never downloads llama.cpp binaries: `pip install 'lorakit[gguf-check]'` builds llama-cpp-python from
source with this machine's compiler (scripts/setup.sh installs a wheel cached under
${LORAKIT_CACHE:-~/.cache/lorakit}/wheels when one exists). Without it, --quantize names the alternative.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

from lorakit.deploy.output import atomic_file
from lorakit.errors import LorakitError

QUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
               "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "IQ4_XS")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def check_quant_type(qtype: str) -> str:
    """Returns the upper-case llama.cpp type name; LorakitError when unknown or llama-cpp-python is absent."""
    q = qtype.upper()
    if q not in QUANT_TYPES:
        raise LorakitError(f"--quantize {qtype}: choose one of {', '.join(QUANT_TYPES)}")
    if not available():
        raise LorakitError(f"--quantize {q} uses llama.cpp's own quantizer, which needs llama-cpp-python: "
                           f"pip install 'lorakit[gguf-check]' (builds llama.cpp from source; a few minutes). "
                           f"Without it use --outtype q8_0, or run llama.cpp's llama-quantize on the f16 file.")
    return q


def quantize_gguf(src: str | Path, dst: str | Path, qtype: str, threads: int | None = None) -> Path:
    """Quantizes GGUF file `src` into `dst` (atomically) with llama.cpp's llama_model_quantize; returns dst."""
    import llama_cpp

    q = check_quant_type(qtype)
    dst = Path(dst)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q}")
    params.nthread = threads or max(1, os.cpu_count() or 1)
    with atomic_file(dst) as tmp:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise LorakitError(f"llama.cpp could not quantize {src} to {q} (llama_model_quantize returned {rc}).")
    return dst


def greedy_tokens(model_path: str | Path, prompts: list[list[int]], max_new_tokens: int, eos: int | None,
                  lora: str | Path | None = None, threads: int = 2) -> list[list[int]]:
    """llama.cpp's greedy continuation (argmax of each step's logits) of each prompt's token ids, stopping after eos.
    The KV cache is f32, so that differences come from the weights, not from llama.cpp's default f16 cache."""
    import llama_cpp
    import numpy as np

    kw = {"lora_path": str(lora)} if lora else {}
    n_ctx = max(len(p) for p in prompts) + max_new_tokens + 8
    llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=threads,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kw)
    outs = []
    try:
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            got = []
            for _ in range(max_new_tokens):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                got.append(nxt)
                if nxt == eos:
                    break
                llm.eval([nxt])
            outs.append(got)
    finally:
        llm.close()
    return outs
