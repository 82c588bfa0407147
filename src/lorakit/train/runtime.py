"""The process a run lives in: device, seeds, RNG state, torchrun's rank/world, run folders, stop signals."""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

RUNS = Path("runs")


def default_out_dir() -> Path:
    """Returns runs/<YYYYmmdd-HHMMSS> (with a suffix if that exists)."""
    base = RUNS / time.strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        out, i = Path(f"{base}-{i}"), i + 1
    return out


def dist_env() -> tuple[int, int]:
    """Returns (rank, world_size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """Returns True on rank 0, the only process that prints progress and writes files."""
    return dist_env()[0] == 0


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Returns the python, numpy and torch RNG states as data `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores the RNG states captured by rng_state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])



def local_device() -> torch.device:
    """Returns this process's device: cuda:LOCAL_RANK when CUDA is present, else cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """Returns the device to train on: auto = cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if name == "auto":
        return local_device()
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        # plain "cuda" under torchrun: each process takes its own GPU, not all of them cuda:0
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def model_device(model: nn.Module) -> torch.device:
    """Returns the device of the model's first parameter (cpu for a model without parameters)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """Returns the batch with every tensor on `device` (the same dict when it is already there)."""
    if all(not isinstance(v, torch.Tensor) or v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}



class StopRequest:
    """Catches SIGINT/SIGTERM while training: the loop checkpoints at the next step boundary and exits.

    A second signal of the same kind falls through to the default behaviour (immediate interrupt).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        """Returns 'SIGINT' / 'SIGTERM' once a signal arrived, else None."""
        return signal.Signals(self.signum).name if self.signum else None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
