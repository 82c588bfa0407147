"""Adapters on disk: atomic folder writes (atomic.py), PEFT's adapter format (peft_format.py), and where a
run's adapter is (adapter_paths.py: --adapter takes a run, checkpoint or adapter folder)."""
from lorakit.io.adapter_paths import resolve_adapter_dir, run_dir_of
from lorakit.io.atomic import atomic_write_dir, check_output_dir
from lorakit.io.peft_format import (CONFIG_NAME, PICKLE_NAME, PREFIX, WEIGHTS_NAME, adapter_state_dict, base_identity,
                                    load_adapter, read_adapter, read_metadata, save_adapter, write_adapter)

__all__ = ["atomic_write_dir", "check_output_dir", "CONFIG_NAME", "WEIGHTS_NAME", "PICKLE_NAME", "PREFIX",
           "adapter_state_dict", "base_identity", "load_adapter", "read_adapter", "read_metadata", "save_adapter",
           "write_adapter", "resolve_adapter_dir", "run_dir_of"]
