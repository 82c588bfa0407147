"""Adapters on disk: atomic folder writes (atomic.py) and PEFT's adapter format (peft_format.py)."""
from lorakit.io.atomic import atomic_write_dir, check_output_dir
from lorakit.io.peft_format import (CONFIG_NAME, PICKLE_NAME, PREFIX, WEIGHTS_NAME, adapter_state_dict, base_identity,
                                    load_adapter, read_adapter, read_metadata, save_adapter, write_adapter)

__all__ = ["atomic_write_dir", "check_output_dir", "CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME", "PREFIX",
           "adapter_state_dict", "base_identity", "load_adapter", "read_adapter", "read_metadata", "save_adapter",
           "write_adapter"]
