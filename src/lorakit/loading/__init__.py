"""Loading base models: pretrained.py (a HF folder, hub id, GGUF or the embedded default); tokenizer.py (the
tokenizer alone, so data is checked before the model loads); the streaming loader (tensor by tensor, quantized
as it reads) and the memory plan.

    load_pretrained_streaming(spec, quantize=None|"nf4", dtype=None, device="cpu") -> (model, tokenizer)
    plan_memory(config_or_path, ...) -> MemoryPlan          check_fits(plan, config_or_path) -> None | ConfigError
"""
from lorakit.loading.checkpoint_files import CheckpointFiles, open_checkpoint
from lorakit.loading.plan import MemoryPlan, check_fits, plan_memory, replan
from lorakit.loading.streaming import load_pretrained_streaming, stream_folder

__all__ = ["CheckpointFiles", "open_checkpoint", "load_pretrained_streaming", "stream_folder", "MemoryPlan",
           "plan_memory", "check_fits", "replan"]
