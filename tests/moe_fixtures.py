"""Tiny random MoE models for tests: bench/architectures.py's builders, cached per architecture and deep-copied."""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "bench" / "architectures.py"
_spec = importlib.util.spec_from_file_location("lorakit_bench_architectures_fixtures", _PATH)
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))
_BASES: dict = {}


def base(arch="qwen3_moe"):
    """Returns a fresh copy of the tiny random `arch` model (built once per process)."""
    if arch not in _BASES:
        _BASES[arch] = matrix.build(arch)
    return copy.deepcopy(_BASES[arch])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits
