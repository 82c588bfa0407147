"""Per-architecture GGUF conventions: llama.cpp's architecture name, its hyperparameter keys, its tensor names
(gguf.get_tensor_name_map) and the changes llama.cpp expects of the Hugging Face weights. These follow
llama.cpp's reference converter (convert_hf_to_gguf.py):

    Llama, Mistral   arch "llama": Q and K rows permuted from HF's rotate-half RoPE layout to llama.cpp's
                     interleaved one (per head: [x0..x_{d/2-1}, x_{d/2}..] -> [x0, x_{d/2}, x1, ...]);
                     Llama-3 RoPE scaling as a rope_freqs tensor
    Qwen2, Qwen3     NEOX RoPE, no permutation (Qwen3: q_norm / k_norm)
    Gemma 1, 2, 3    RMSNorm weights stored as w (HF computes x·(1 + w)): +1 on every *norm.weight;
                     the sqrt(hidden) embedding scale is applied by llama.cpp itself, so the embedding is
                     written unscaled; lm_head is the tied embedding and not written
    Phi-3            fused qkv_proj / gate_up_proj map to attn_qkv / ffn_up as they are; LongRoPE factors
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError


class UnsupportedArchitectureError(LorakitError):
    """The model's architecture has no GGUF export here."""


@dataclass(frozen=True)
class Arch:
    hf: str
    gguf_name: str          # attribute of gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_shift: float = 0.0
    skip_lm_head: bool = False

    @property
    def model_arch(self):
        import gguf
        return getattr(gguf.MODEL_ARCH, self.gguf_name)

    @property
    def name(self) -> str:
        import gguf
        return gguf.MODEL_ARCH_NAMES[self.model_arch]


ARCHS = {a.hf: a for a in (
    Arch("LlamaForCausalLM", "LLAMA", permute_qk=True),
    Arch("MistralForCausalLM", "LLAMA", permute_qk=True),
    Arch("Qwen2ForCausalLM", "QWEN2"),
    Arch("Qwen3ForCausalLM", "QWEN3"),
    Arch("GemmaForCausalLM", "GEMMA", norm_shift=1.0, skip_lm_head=True),
    Arch("Gemma2ForCausalLM", "GEMMA2", norm_shift=1.0, skip_lm_head=True),
    Arch("Gemma3ForCausalLM", "GEMMA3", norm_shift=1.0, skip_lm_head=True),
    Arch("Phi3ForCausalLM", "PHI3"),
)}


def supported() -> str:
    return ", ".join(ARCHS)


def arch_for(config: dict) -> Arch:
    """Returns the Arch of a config.json dict; UnsupportedArchitectureError naming the supported ones otherwise."""
    names = config.get("architectures") or [config.get("model_type", "?")]
    for n in names:
        if n in ARCHS:
            return ARCHS[n]
    raise UnsupportedArchitectureError(f"GGUF export does not support the architecture {names[0]}; supported: "
                                       f"{supported()}. (`lorakit merge` writes a safetensors folder for any model.)")


def rope_params(hp: dict) -> dict:
    """The RoPE settings of a config, in transformers 5's rope_parameters form (full-attention ones for Gemma 3)."""
    rp = hp.get("rope_parameters")
    if not rp:
        rp = dict(hp.get("rope_scaling") or {})
        if "type" in rp and "rope_type" not in rp:
            rp["rope_type"] = rp["type"]
        if hp.get("rope_theta") is not None:
            rp["rope_theta"] = hp["rope_theta"]
    return rp.get("full_attention", rp)


def head_dim(hp: dict) -> int:
    return hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]


def write_hparams(w, arch: Arch, hp: dict) -> None:
    """Adds the architecture's hyperparameters to a gguf.GGUFWriter (the keys convert_hf_to_gguf.py writes)."""
    import gguf

    n_head = hp["num_attention_heads"]
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp.get("max_position_embeddings", 4096))
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(hp.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(hp.get("rms_norm_eps", 1e-6))
    rp = rope_params(hp)
    if rp.get("rope_theta") is not None:
        w.add_rope_freq_base(rp["rope_theta"])
    kind, factor = rp.get("rope_type"), rp.get("factor")
    if kind == "linear" and factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
    elif kind in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if arch.gguf_name == "LLAMA":
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(head_dim(hp))
    elif arch.gguf_name == "GEMMA2":
        w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        w.add_sliding_window(hp["sliding_window"])
    elif arch.gguf_name == "GEMMA3":
        if hp.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(hp["final_logit_softcapping"])
        if hp.get("sliding_window_pattern") != 1 and hp.get("sliding_window"):
            w.add_sliding_window(hp["sliding_window"])
        swa = (hp.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta")
        if swa is not None:
            w.add_rope_freq_base_swa(swa)
    elif arch.gguf_name == "PHI3":
        rot = rp.get("partial_rotary_factor", hp.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(rot * hp["hidden_size"]) // n_head)
        w.add_rope_scaling_orig_ctx_len(rp.get("original_max_position_embeddings")
                                        or hp.get("original_max_position_embeddings") or hp["max_position_embeddings"])
        w.add_sliding_window(hp.get("sliding_window") or 0)
        orig = rp.get("original_max_position_embeddings") or hp.get("original_max_position_embeddings")
        if rp.get("long_factor") and orig:
            scale = hp["max_position_embeddings"] / orig
            if kind in ("su", "longrope"):
                w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
            elif kind == "yarn":
                w.add_rope_scaling_attn_factors(0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0)


def tensor_name(arch: Arch, hp: dict, name: str) -> str | None:
    """Returns llama.cpp's name for an HF tensor name, None for tensors llama.cpp does not use."""
    import gguf

    if arch.skip_lm_head and name == "lm_head.weight":
        return None
    if name.endswith((".rotary_emb.inv_freq", "rotary_emb.inv_freq")):
        return None
    mapped = gguf.get_tensor_name_map(arch.model_arch, hp["num_hidden_layers"]).get_name(
        name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise UnsupportedArchitectureError(f"tensor {name} has no llama.cpp name for {arch.hf}; this checkpoint is not "
                                           f"a plain {arch.hf} (supported: {supported()}).")
    return mapped


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(arch: Arch, hp: dict, name: str) -> int | None:
    """The head count to permute `name`'s rows with (Q: heads, K: kv heads), None when it is not permuted."""
    if not arch.permute_qk:
        return None
    if name.endswith("q_proj.weight"):
        return hp["num_attention_heads"]
    if name.endswith("k_proj.weight"):
        return hp.get("num_key_value_heads") or hp["num_attention_heads"]
    return None


def transform(arch: Arch, hp: dict, name: str, t: torch.Tensor) -> torch.Tensor:
    """The HF tensor as llama.cpp expects it (see the module docstring)."""
    heads = qk_heads(arch, hp, name)
    if heads is not None:
        t = permute_rows(t, heads)
    if arch.norm_shift and name.endswith("norm.weight"):
        t = t.float() + arch.norm_shift
    return t


def extra_tensors(arch: Arch, hp: dict) -> list[tuple[str, torch.Tensor]]:
    """Tensors llama.cpp needs that HF computes: Llama-3 rope_freqs, Phi-3 LongRoPE factors."""
    import gguf

    rp = rope_params(hp)
    kind = str(rp.get("rope_type", "")).lower()
    names = gguf.TENSOR_NAMES
    if arch.gguf_name == "LLAMA" and kind == "llama3":
        dim, base = head_dim(hp), rp.get("rope_theta", 10000.0)
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
        old = rp.get("original_max_position_embeddings", 8192)
        out = []
        for f in freqs.tolist():
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                out.append(1.0)
            elif wavelen > old / lo:
                out.append(factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return [(names[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", torch.tensor(out, dtype=torch.float32))]
    if arch.gguf_name == "PHI3" and rp.get("long_factor"):
        return [(names[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", torch.tensor(rp["long_factor"], dtype=torch.float32)),
                (names[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight", torch.tensor(rp["short_factor"], dtype=torch.float32))]
    return []
