"""Data-parallel training under torchrun: process group, model wrapping, reductions. Single-process by default.

    torchrun --standalone --nproc_per_node 2 -m lmcore.pretrain --params params.yaml

torchrun starts one process per device and sets RANK, LOCAL_RANK and WORLD_SIZE; `init_from_env` joins the
group (gloo on CPU, NCCL on CUDA). `current()` then tells the trainer its rank; without a process group it
is rank 0 of 1 and every helper here is a no-op, so `lmcore.pretrain.pretrain` runs unchanged alone.

- ddp: `DistributedDataParallel` replicates the model and averages gradients in buckets during backward.
- fsdp: FSDP2 `fully_shard`, one group per transformer block and one for the rest: parameters, gradients
  and optimizer state are sharded across ranks and gathered block by block for each forward and backward.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

DDP = "ddp"
FSDP = "fsdp"


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and reports metrics."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(device_type: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (no-op for a single process or when already joined).

    Args: device_type: "cuda" uses NCCL and pins this process to cuda:LOCAL_RANK; "cpu" uses gloo; "auto":
        cuda when available.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return current()
    if not dist.is_initialized():
        if device_type == "auto":
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return current()


def current() -> DistInfo:
    """This process's place in the initialised process group; rank 0 of 1 when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size())


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, strategy: str, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """The module to train: `model` itself alone, a DDP wrapper, or `model` sharded in place (fsdp).

    Under fsdp the parameters become DTensor shards; build the optimizer after wrapping.
    """
    if not info.enabled:
        return model
    if strategy == DDP:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == FSDP:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (info.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # embeddings, final norm, head: the rest
        return model
    raise ValueError(f"distributed strategy {strategy!r}: expected {DDP!r} or {FSDP!r}")


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Backward inside this context all-reduces gradients only when `enabled` (the last micro-batch)."""
    if enabled or not dist.is_initialized():
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks (in place; `t` itself when alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over all ranks (in place)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_ranks_true(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def root_gathered(model: torch.nn.Module) -> Iterator[None]:
    """Under fsdp, the root group's parameters (embeddings, final norm, head) gathered for calls that are not
    `forward` (benchmark scoring calls `hidden`, then `lm_head` at a few positions); each block still gathers its
    own when called. Collective: every rank enters it. A no-op for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
