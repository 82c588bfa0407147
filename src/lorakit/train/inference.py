"""Loading a trained adapter for generation and evaluation, with the run's own template, system and quantization."""
from __future__ import annotations

import sys

from lorakit.errors import ConfigError
from lorakit.io.adapter_paths import resolve_adapter_dir, run_dir_of
from lorakit.train.options import load_options, read_config_file
from lorakit.train.prepare import (calibration_inputs, load_data, quantize_gptq, resolve_dtype, streamable,
                                   tokenize_training)
from lorakit.train.runtime import resolve_device


def load_for_inference(model_spec: str | None, adapter: str | None, template: str | None = None,
                       system: str | None = None, device: str = "auto", trust_remote_code: bool = False,
                       quantize: str | None = None, dtype: str | None = None):
    """Returns (model, tokenizer, template, system) with the adapter loaded; template/system default to the run's.

    An adapter written by `lorakit train` sits in a run folder whose config.yaml names the template, system
    prompt and quantization it was trained with; generation and evaluation use the same unless told otherwise
    (quantize: "nf4" or "none"; None = the run's setting, else none; dtype: as `lorakit train --dtype`,
    None = the run's setting, else auto). Safetensors folders, GGUF files and the embedded default load tensor
    by tensor (lorakit.train.prepare.load_base's rule, nf4-gptq block by block as training did); remote-code
    models load whole.
    """
    if quantize not in (None, "none", "nf4", "nf4-gptq"):
        raise ConfigError(f"--quantize {quantize!r}: choose none, nf4 or nf4-gptq")
    import lorakit
    from lorakit.loading.pretrained import load_model

    run_cfg = {}
    if adapter:  # a run, checkpoint or adapter folder; the run's config.yaml (if any) names how it trained
        adapter = str(resolve_adapter_dir(adapter))
        run_dir = run_dir_of(adapter)
        if run_dir is not None:
            try:
                run_cfg = read_config_file(run_dir / "config.yaml")
            except ConfigError:
                pass
    spec = model_spec or run_cfg.get("model") or "default"
    how = quantize or run_cfg.get("quantize")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype or run_cfg.get("dtype") or "auto", dev)
    calibration = None
    if how == "nf4-gptq":  # the same base the adapter trained on: GPTQ on the run's own calibration rows
        from lorakit.loading.tokenizer import load_tokenizer
        o = load_options(base={k: v for k, v in run_cfg.items() if k != "resume"})
        tok = load_tokenizer(spec, trust_remote_code=trust_remote_code)
        train_ex, _ = tokenize_training(o, load_data(o, tok, lambda *a, **k: None)["train_records"], tok)
        if not train_ex:
            raise ConfigError("--quantize nf4-gptq needs the run's training data for calibration; none was found")
        calibration = calibration_inputs(train_ex, o.quant_calibration)
    if how == "nf4-gptq" and streamable(spec, "nf4", trust_remote_code):  # as lorakit train streamed it
        from lorakit.loading.streaming import load_pretrained_streaming
        model, tokenizer = load_pretrained_streaming(spec, quantize="nf4-gptq", dtype=dt, device=dev,
                                                     calibration=calibration)
        calibration = None
    elif streamable(spec, None if how in (None, "none") else how, trust_remote_code):
        from lorakit.loading.streaming import load_pretrained_streaming
        model, tokenizer = load_pretrained_streaming(spec, quantize="nf4" if how == "nf4" else None, dtype=dt,
                                                     device=dev)
    else:
        import torch
        model, tokenizer = load_model(spec, trust_remote_code=trust_remote_code,
                                      dtype=getattr(torch, dt) if dt else torch.float32)
        model.to(dev)
        if how == "nf4":
            from lorakit.model.quantize import quantize as quantize_model
            model = quantize_model(model) or model
    if calibration is not None:  # the whole-model loader: GPTQ over the loaded model
        quantize_gptq(model, calibration, log=lambda msg: print(msg, file=sys.stderr))  # stdout may be --json
    if adapter:
        lorakit.load_adapter(model, adapter)
    model.eval()
    return model, tokenizer, template or run_cfg.get("template", "auto"), system or run_cfg.get("system")


def merge_for_inference(model) -> bool:
    """Folds the active adapter into the base weights for generation or evaluation, as serving does: nothing
    trains afterwards, so the LoRA branch's extra small matmuls per layer are pure overhead. Returns False where
    it stays unmerged (a 4-bit base: merging would dequantize it)."""
    from lorakit.model.merge import merge
    from lorakit.ops.nf4 import is_4bit
    if any(is_4bit(m) for m in model.modules()):
        return False
    merge(model)
    return True
