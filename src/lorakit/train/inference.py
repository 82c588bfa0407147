"""Loading a trained adapter for generation and evaluation, with the run's own template, system and quantization."""
from __future__ import annotations

import sys
from pathlib import Path

from lorakit.errors import ConfigError
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
    by tensor (lorakit.train.prepare.load_base's rule); nf4-gptq and remote-code models load whole.
    """
    if quantize not in (None, "none", "nf4", "nf4-gptq"):
        raise ConfigError(f"--quantize {quantize!r}: choose none, nf4 or nf4-gptq")
    import lorakit
    from lorakit.loading.pretrained import load_model

    run_cfg = {}
    if adapter and (Path(adapter) / "state.json").is_file():  # a checkpoint folder: use its adapter/
        adapter = str(Path(adapter) / "adapter")
    if adapter:
        # out/adapter or out/checkpoints/step-N/adapter: the run's config.yaml is 1 or 3 levels up
        for run_dir in (Path(adapter).parent, Path(adapter).parent.parent.parent):
            if (run_dir / "config.yaml").is_file():
                try:
                    run_cfg = read_config_file(run_dir / "config.yaml")
                except ConfigError:
                    pass
                break
    spec = model_spec or run_cfg.get("model") or "default"
    how = quantize or run_cfg.get("quantize")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype or run_cfg.get("dtype") or "auto", dev)
    if streamable(spec, None if how in (None, "none") else how, trust_remote_code):
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
    if how == "nf4-gptq":  # the same base the adapter trained on: GPTQ on the run's own calibration rows
        o = load_options(base={k: v for k, v in run_cfg.items() if k != "resume"})
        train_ex, _ = tokenize_training(o, load_data(o, tokenizer, lambda *a, **k: None)["train_records"], tokenizer)
        if not train_ex:
            raise ConfigError("--quantize nf4-gptq needs the run's training data for calibration; none was found")
        quantize_gptq(model, calibration_inputs(train_ex, o.quant_calibration),
                      log=lambda msg: print(msg, file=sys.stderr))  # stdout may be --json
    if adapter:
        lorakit.load_adapter(model, adapter)
    model.eval()
    return model, tokenizer, template or run_cfg.get("template", "auto"), system or run_cfg.get("system")
