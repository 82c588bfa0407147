"""lorakit: LoRA and QLoRA fine-tuning for PyTorch models.

    h = W0·x + (alpha/r)·B·(A·x)      W0 frozen, A: r×k random, B: d×r zero at start
"""
from lorakit.adaptive import enable_adaptive_rank
from lorakit.adapters import (active_adapters, combine_adapters, delete_adapter, disable_adapters, set_adapter,
                              switch_merged_adapter)
from lorakit.checkpointing import enable_gradient_checkpointing
from lorakit.compiling import compile_blocks, uncompile_blocks
from lorakit.config import LoraConfig
from lorakit.fuse import fuse_shared_inputs, unfuse
from lorakit.errors import AdapterFileError, ConfigError, DataError, LorakitError, ModelLoadError
from lorakit.inject import (find_targets, inject, merge, merge_and_unload, summary, trainable_parameters, unload,
                            unmerge)
from lorakit.io import load_adapter, read_adapter, save_adapter, write_adapter
from lorakit.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, LoraMergedLinear
from lorakit.quant import dequantize, format_memory_report, memory_report, quantize

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "inject", "find_targets", "trainable_parameters", "summary", "merge", "unmerge",
    "merge_and_unload", "unload", "set_adapter", "active_adapters", "disable_adapters", "delete_adapter",
    "switch_merged_adapter", "combine_adapters", "save_adapter", "load_adapter", "read_adapter", "write_adapter",
    "fuse_shared_inputs", "unfuse", "enable_gradient_checkpointing", "compile_blocks",
    "uncompile_blocks", "quantize", "dequantize", "memory_report", "format_memory_report", "enable_adaptive_rank",
    "LoraLayer", "LoraLinear", "LoraMergedLinear", "LoraEmbedding", "LoraConv",
    "LorakitError", "ConfigError", "DataError", "AdapterFileError", "ModelLoadError",
]
