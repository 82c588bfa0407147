"""GGUF files for llama.cpp (and Ollama, LM Studio): the merged model, or the adapter alone as a GGUF LoRA.

    export_gguf(base, adapter, out, outtype)          base (+ adapter folded in) -> one .gguf
    export_adapter_gguf(base, adapter, out, outtype)  adapter -> GGUF LoRA (general.type=adapter), for --lora

Written with the `gguf` package (GGUFWriter, MODEL_ARCH, tensor-name maps, Keys): the header and tensor table
first, then each tensor as it is merged, so one base tensor is in memory at a time (the base is read shard by
shard, deploy.sharded_merge). The file is built beside --out under a temporary name and renamed when complete.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lorakit.deploy import gguf_arch
from lorakit.deploy.deltas import AdapterUpdates
from lorakit.deploy.output import atomic_file, check_disk, check_output_file
from lorakit.deploy.sharded_merge import load_updates, merged_tensors
from lorakit.deploy.sources import base_folder, read_checkpoint, resolve_adapter
from lorakit.errors import LorakitError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class AdapterNotApplicableError(LorakitError):
    """llama.cpp cannot apply this adapter as a GGUF LoRA."""


def _file_type(outtype: str):
    import gguf
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def _qtype(gguf_name: str, shape: tuple[int, ...], outtype: str):
    """The GGML type convert_hf_to_gguf.py picks: F32 for 1-D tensors, norms and non-weights; else --outtype."""
    import gguf
    T = gguf.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or gguf_name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return T.F32
    q = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[outtype]
    if q == T.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] != 0:
        return T.F16  # the converter's fallback when a row does not split into Q8_0 blocks
    return q


def _encode(t: torch.Tensor, qtype):
    """Returns the numpy array to write for tensor `t` in GGML type `qtype`."""
    import gguf
    data = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


@dataclass
class _Entry:
    name: str            # GGUF name
    shape: tuple
    qtype: object

    def info(self):
        """(shape, numpy dtype, nbytes, raw_dtype) for GGUFWriter.add_tensor_info."""
        import gguf
        T = gguf.GGMLQuantizationType
        if self.qtype in (T.F32, T.F16):
            dt = np.float32 if self.qtype == T.F32 else np.float16
            return self.shape, np.dtype(dt), int(np.prod(self.shape)) * np.dtype(dt).itemsize, None
        byte_shape = gguf.quant_shape_to_byte_shape(self.shape, self.qtype)
        return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), self.qtype


def _write(out: Path, arch_name: str, metadata: Callable, entries: list[_Entry], stream) -> None:
    """Writes a GGUF file: metadata(writer), the tensor table from `entries`, then the arrays `stream` yields
    (in the same order), to a temporary file renamed onto `out` when complete."""
    import gguf

    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, arch_name)
        metadata(w)
        for e in entries:
            shape, dt, nbytes, raw = e.info()
            w.add_tensor_info(e.name, shape, dt, nbytes, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        count = 0
        for e, array in stream:
            if array.nbytes != e.info()[2]:
                raise LorakitError(f"internal error: {e.name} has {array.nbytes} bytes, {e.info()[2]} planned")
            w.write_tensor_data(array)
            count += 1
        if count != len(entries):
            raise LorakitError(f"internal error: {count} tensors written, {len(entries)} planned")
        w.close()


def _general(w, name: str, outtype: str | None, kind: str = "model") -> None:
    import gguf
    w.add_type(gguf.GGUFType.ADAPTER if kind == "adapter" else gguf.GGUFType.MODEL)
    w.add_name(name)
    if outtype is not None:
        w.add_file_type(_file_type(outtype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _inputs(base: str | None, out, outtype: str, force: bool):
    """Checks --outtype and --out, finds the base checkpoint and its architecture: (out, folder, ckpt, config, arch)."""
    if outtype not in OUTTYPES:
        raise LorakitError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    out = check_output_file(out, force)
    folder = base_folder(base)
    ckpt = read_checkpoint(folder)
    return out, folder, ckpt, ckpt.config, gguf_arch.arch_for(ckpt.config)


def export_gguf(base: str | None, adapter: str | None, out: str | Path, outtype: str = "f16", force: bool = False,
                allow_pickle: bool = False, name: str | None = None, log: Callable[[str], None] = print) -> Path:
    """Writes the base model, with the adapter folded in when given, as one GGUF file; returns its path."""
    out, folder, ckpt, hp, arch = _inputs(base, out, outtype, force)
    updates = load_updates(adapter, ckpt, allow_pickle, log)
    extras = gguf_arch.extra_tensors(arch, hp)
    entries, plan = [], []
    for e_name, t in extras:
        entries.append(_Entry(e_name, tuple(t.shape), _qtype(e_name, tuple(t.shape), "f32")))
    for file, names in ckpt.shards.items():
        for n in names:
            g = gguf_arch.tensor_name(arch, hp, n)
            if g is not None:
                entries.append(_Entry(g, ckpt.shapes[n], _qtype(g, ckpt.shapes[n], outtype)))
                plan.append(n)
    check_disk(out, sum(e.info()[2] for e in entries) + (32 << 20), "the GGUF file")
    by_hf = dict(zip(plan, entries[len(extras):]))

    def metadata(w):
        from lorakit.deploy.gguf_vocab import add_vocab
        _general(w, name or (folder.name + ("-" + Path(adapter).name if adapter else "")), outtype)
        gguf_arch.write_hparams(w, arch, hp)
        add_vocab(w, folder, hp)

    def stream():
        for (e_name, t), e in zip(extras, entries):
            yield e, _encode(t, e.qtype)
        for _, n, t in merged_tensors(ckpt, updates):
            e = by_hf.get(n)
            if e is not None:
                yield e, _encode(gguf_arch.transform(arch, hp, n, t), e.qtype)

    _write(out, arch.name, metadata, entries, stream())
    log(f"wrote {out} ({out.stat().st_size / 1e6:.0f} MB, {outtype}, llama.cpp architecture {arch.name}"
        f"{', adapter folded in' if updates else ', base model only'}); run it with llama.cpp: llama-cli -m {out}")
    return out


def adapter_gguf_tensors(updates: AdapterUpdates, arch, hp: dict) -> list[tuple[str, torch.Tensor]]:
    """The GGUF LoRA tensors (<name>.lora_a, <name>.lora_b) of an adapter, as convert_lora_to_gguf.py writes them,
    with every per-module scale folded into B so that llama.cpp's alpha/rank gives PEFT's scale."""
    cfg = updates.config
    if updates.uses_dora:
        raise AdapterNotApplicableError("the adapter uses DoRA (use_dora), which llama.cpp's LoRA loader cannot apply. "
                                        "Export the merged model instead: lorakit export --base ... --adapter ... --out model.gguf")
    if updates.replacements:
        raise AdapterNotApplicableError(
            f"the adapter trains whole modules ({', '.join(sorted(updates.replacements)[:4])}: modules_to_save or a "
            f"trained bias), which a GGUF LoRA cannot carry. Export the merged model instead: lorakit export --base ... "
            f"--adapter ... --out model.gguf")
    alpha = float(cfg.lora_alpha)
    out = []
    for name, u in updates.updates.items():
        g = gguf_arch.tensor_name(arch, hp, name)
        if g is None:
            raise AdapterNotApplicableError(f"the adapter updates {name}, which llama.cpp ties to the input embedding "
                                            f"for {arch.hf} and ignores. Export the merged model instead.")
        A, B = u.A.float(), u.B.float()
        B = B * (u.scale / (alpha / u.rank))         # llama.cpp scales by alpha / rank; PEFT's may differ
        heads = gguf_arch.qk_heads(arch, hp, name)
        if heads is not None:
            B = gguf_arch.permute_rows(B, heads)      # W = B·A: permuting W's rows permutes B's rows
        if u.kind == "embedding":
            if not g.startswith("token_embd"):
                raise AdapterNotApplicableError(f"embedding LoRA on {name} cannot be expressed for llama.cpp; export merged.")
            A = A.t()                                 # llama.cpp's get_rows path: lora_a stored transposed
        out += [(g + ".lora_a", A.contiguous()), (g + ".lora_b", B.contiguous())]
    return out


def export_adapter_gguf(base: str | None, adapter: str, out: str | Path, outtype: str = "f16", force: bool = False,
                        allow_pickle: bool = False, log: Callable[[str], None] = print) -> Path:
    """Writes the adapter as a GGUF LoRA file (llama.cpp --lora / Ollama ADAPTER); returns its path."""
    import gguf

    out, folder, ckpt, hp, arch = _inputs(base, out, outtype, force)
    adir = resolve_adapter(adapter)
    updates = AdapterUpdates(adir, allow_pickle=allow_pickle)
    if "lm_head.weight" not in ckpt.shapes and "lm_head.weight" in updates.updates:
        raise AdapterNotApplicableError("the adapter updates lm_head, which this model ties to the input embedding "
                                        "(llama.cpp ignores LoRA on a tied output head). Export the merged model instead.")
    updates.check(ckpt.shapes, f"the base checkpoint {folder}")
    tensors = adapter_gguf_tensors(updates, arch, hp)
    entries = [_Entry(n, tuple(t.shape), _qtype(n, tuple(t.shape), outtype)) for n, t in tensors]
    check_disk(out, sum(e.info()[2] for e in entries) + (1 << 20), "the GGUF adapter")

    def metadata(w):
        _general(w, adir.parent.name if adir.name == "adapter" else adir.name, outtype, kind="adapter")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(updates.config.lora_alpha))

    _write(out, arch.name, metadata, entries, ((e, _encode(t, e.qtype)) for e, (_, t) in zip(entries, tensors)))
    folded = updates.config.use_rslora or bool(updates.config.alpha_pattern)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(tensors) // 2} LoRA pairs, {outtype}, alpha "
        f"{updates.config.lora_alpha:g}{'; rsLoRA/alpha_pattern scales folded into lora_b' if folded else ''}); "
        f"use it with llama.cpp: llama-cli -m BASE.gguf --lora {out}")
    return out
