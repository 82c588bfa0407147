"""Multi-process training on torch.distributed (launched by torchrun): process group, DDP, FSDP2, launcher.

    torchrun --nproc_per_node N -m lorakit train ...      (or: lorakit train --nproc N ...)
        rank r of N: same model, same LoRA init ---- iterate_batches(rank, world): slice r of every global batch
                     |                                         (global batch = batch_size x N, x grad_accum per step)
        strategy ddp:  DistributedDataParallel; LoRA grads averaged over ranks (bucketed all-reduce)
        strategy fsdp: fully_shard(block) for each transformer block, then the root: the FROZEN base is sharded;
                       the LoRA weights are kept whole on every rank (ignored_params) and their grads averaged
                       by one flat all-reduce at the end of each backward
        train_step:    loss / (target tokens of the GLOBAL batch) x N  ->  the same update as one process
        rank 0 only:   progress, metrics, checkpoints, the adapter (the LoRA weights are whole on every rank)

Why FSDP2 keeps LoRA whole: the base is >99% of the bytes, so sharding it is the memory win; FSDP2 can also
shard the LoRA weights (mixed requires_grad works; checked on gloo), but then every checkpoint, resume and
adapter save becomes a collective over DTensors. Whole LoRA weights keep checkpoints plain PEFT files written
by rank 0 and read back by every rank, with the optimizer state (2x LoRA) replicated.

Backend: "cpu:gloo,cuda:nccl" when CUDA is present (NCCL for GPU tensors, gloo for CPU ones), else gloo.
"""
from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import ConfigError, LorakitError
from lorakit.ops.nf4 import is_4bit
from lorakit.train.runtime import default_out_dir, dist_env, local_device

STRATEGIES = ("auto", "none", "ddp", "fsdp")


# ---------------------------------------------------------------------------------------------- process group
def launched_by_torchrun() -> bool:
    """Returns True when this process was started by torchrun (its rendezvous variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def backend() -> str:
    """Returns the process-group backend: NCCL for CUDA tensors (with gloo for CPU ones), gloo without CUDA."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def is_distributed() -> bool:
    """Returns True when a process group is up."""
    return dist.is_available() and dist.is_initialized()


def init_distributed() -> tuple[int, int]:
    """Joins torchrun's process group (once; torn down at exit); returns (rank, world_size)."""
    if launched_by_torchrun() and not is_distributed():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend())
        atexit.register(teardown)
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else dist_env()


def teardown() -> None:
    """Leaves the process group if this process is in one."""
    if is_distributed():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- collectives
def global_tokens(n_local: int) -> tuple[int, int]:
    """Returns (target tokens summed over ranks, world size); (n_local, 1) in a single process.

    train_step divides the loss by the first and multiplies it by the second: DDP/FSDP average gradients over
    ranks, so each rank's share of the global-batch loss must be scaled back up by the world size.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return n_local, 1
    t = torch.tensor([float(n_local)], device=comm_device())
    dist.all_reduce(t)
    return int(t.item()), dist.get_world_size()


def global_sum(x: float) -> float:
    """Returns x summed over ranks (x itself in a single process)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return float(t.item())


def agree_stop(signum: int | None) -> int | None:
    """Returns the signal any rank caught (so every rank stops after the same step), or None."""
    if not is_distributed() or dist.get_world_size() == 1:
        return signum
    t = torch.tensor([signum or 0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def global_sums(*values: float) -> tuple[float, ...]:
    """Returns the values summed over ranks in one all-reduce (the values themselves in a single process)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t)
    return tuple(t.tolist())


def comm_device() -> torch.device:
    """Returns the device collectives use: this process's GPU under NCCL, else the CPU."""
    return local_device() if "nccl" in str(dist.get_backend()) and torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------- strategies
def resolve_strategy(strategy: str | None, world_size: int) -> str:
    """Returns none, ddp or fsdp: auto means ddp with several processes and none with one."""
    s = (strategy or "auto").lower()
    if s not in STRATEGIES:
        raise ConfigError(f"option strategy: must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if s == "auto":
        return "ddp" if world_size > 1 else "none"
    return s


def effective_batch(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Returns the examples per optimizer step: per-device batch x gradient accumulation x world size."""
    return batch_size * grad_accum * world_size


def wrap_for_distributed(model: nn.Module, strategy: str | None = "auto", batch_size: int | None = None,
                         grad_accum: int = 1, log: Callable[[str], None] = print) -> nn.Module:
    """Returns the module to train: DDP around `model`, `model` sharded in place by FSDP2, or `model` itself.

    Call it after LoRA injection (and gradient checkpointing). Keep using `model` for evaluation, generation,
    checkpoints and saving: its LoRA weights are whole on every rank whatever the strategy.
    """
    rank, world = init_distributed()
    chosen = resolve_strategy(strategy, world)
    if chosen != "none" and not is_distributed():
        raise ConfigError(f"strategy {chosen} needs several processes: launch with "
                          f"`torchrun --nproc_per_node N -m lorakit train ...` or `lorakit train --nproc N ...`")
    if batch_size is not None:
        log(f"distributed: strategy {chosen}, {world} process(es)"
            + (f", backend {dist.get_backend()}" if is_distributed() else "")
            + f"; effective batch = {batch_size} per device x {grad_accum} accumulation x {world} processes = "
            f"{effective_batch(batch_size, grad_accum, world)} examples per step")
    if chosen == "none":
        return model
    broadcast_trainable(model)
    return wrap_ddp(model) if chosen == "ddp" else shard_fsdp(model)


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Returns the parameters that require grad (the LoRA weights, plus modules_to_save / biases if trained)."""
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def broadcast_trainable(model: nn.Module) -> None:
    """Copies rank 0's trainable weights to every rank (the frozen base is loaded identically everywhere)."""
    for p in trainable(model):
        dist.broadcast(p.data, src=0)


def wrap_ddp(model: nn.Module) -> nn.Module:
    """Returns DistributedDataParallel over `model`, reducing only the trainable (LoRA) gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    device = next(iter(trainable(model))).device
    # init_sync=False: no broadcast of the whole frozen base (identical on every rank, maybe 4-bit);
    # broadcast_trainable already synced the LoRA weights. Every LoRA weight is used in each forward, so
    # find_unused_parameters stays off (it costs a graph traversal per step).
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, init_sync=False,
               forward_sync_buffers=False, find_unused_parameters=False)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Returns the model's repeated blocks: modules named in `_no_split_modules`, else the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_fsdp(model: nn.Module) -> nn.Module:
    """Returns `model` with FSDP2 `fully_shard` applied to each transformer block and then the root.

    The frozen base is sharded across ranks; trainable parameters are left whole (ignored_params) and their
    gradients averaged over ranks after every backward.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    quantized = [n for n, p in model.named_parameters() if is_4bit(p)]
    if quantized:
        raise LorakitError(
            f"--strategy fsdp cannot shard a 4-bit (QLoRA, quantize=nf4) base: bitsandbytes' Params4bit "
            f"({quantized[0]}, ...) keeps its quantization state outside the tensor and does not implement "
            f"FSDP2's all-gather extension, so it cannot be split across ranks. Use --strategy ddp with "
            f"quantize=nf4 (each GPU holds the whole 4-bit base), or --strategy fsdp with quantize=none.")
    lora = trainable(model)
    device = lora[0].device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    ignored = set(lora)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)
    average_grads_after_backward(lora)
    return model


def average_grads_after_backward(params: list[nn.Parameter]) -> None:
    """Makes every backward average the new gradients of `params` over ranks (one flat all-reduce at its end).

    Only the gradient a backward adds is averaged (what .grad already held is the same on every rank), so
    gradient accumulation over several backwards gives the same result as one big batch.
    """
    fresh: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}

    def reduce() -> None:
        items = list(fresh.values())
        fresh.clear()
        grads = [g for _, g in items]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        for (p, g), avg in zip(items, torch._utils._unflatten_dense_tensors(flat, grads)):
            p.grad += avg - g  # p.grad = (what it held before this backward) + average of the new gradients

    def on_grad(p: nn.Parameter, grad: torch.Tensor) -> None:
        if not fresh:
            torch.autograd.Variable._execution_engine.queue_callback(reduce)
        fresh[id(p)] = (p, grad.detach().clone())

    for p in params:
        p.register_hook(lambda grad, p=p: on_grad(p, grad))


# ---------------------------------------------------------------------------------------------- launcher
def launch_command(nproc: int, config_file: str) -> list[str]:
    """Returns the torchrun command line that runs `lorakit train --config config_file` on nproc local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lorakit", "train", "--config", config_file]


def launch_local(nproc: int, options) -> int:
    """Runs the training `options` under torchrun with nproc processes on this machine; returns its exit status.

    The options travel as a YAML config (exactly what the parent parsed), so the workers see the same run.
    """
    from lorakit.train.options import dump_yaml

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if options.out is None and not options.resume:  # one run folder for all ranks, named here
        options.out = str(default_out_dir())
    with tempfile.TemporaryDirectory(prefix="lorakit-launch-") as tmp:
        config = os.path.join(tmp, "run.yaml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(dump_yaml(options))
        cmd = launch_command(nproc, config)
        print("launching: " + " ".join(cmd), flush=True)
        return subprocess.call(cmd)
