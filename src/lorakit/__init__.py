"""lorakit: LoRA and QLoRA fine-tuning for PyTorch models.

    h = W0·x + (alpha/r)·B·(A·x)      W0 frozen, A: r×k random, B: d×r zero at start
"""
# The old module paths stay attributes of the package, as before the split (compat shims). They load first:
# `lorakit.inject` is also a function, bound below, and an already loaded module is never bound again.
from lorakit import adaptive, adapters, checkpointing, compiling, functional, fuse, inject, quant  # noqa: F401
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFileError, ConfigError, DataError, LorakitError, ModelLoadError
from lorakit.io import load_adapter, read_adapter, save_adapter, write_adapter
from lorakit.layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, LoraMergedLinear
from lorakit.model.activation_checkpointing import enable_gradient_checkpointing
from lorakit.model.adapters import combine_adapters, delete_adapter, disable_adapters, switch_merged_adapter
from lorakit.model.compiling import compile_blocks, uncompile_blocks
from lorakit.model.inject import inject
from lorakit.model.memory import format_memory_report, memory_report
from lorakit.model.merge import merge, merge_and_unload, unload, unmerge
from lorakit.model.quantize import dequantize, quantize
from lorakit.model.shared_input import fuse_shared_inputs, unfuse
from lorakit.model.state import active_adapters, set_adapter
from lorakit.model.summary import summary, trainable_parameters
from lorakit.model.targets import find_targets
from lorakit.train.adaptive import enable_adaptive_rank

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
