"""torchrun support: process group, sharding, and sums across processes.

A single process is the special case world == 1, where every helper is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum in place across processes (float64 statistics of the NC pass, loss sums)."""
        if self.enabled:
            dist.all_reduce(tensor)

    def any(self, flag: bool, device) -> bool:
        """True on every process if it is True on one (used for stop requests at epoch ends)."""
        if not self.enabled:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, obj: Any) -> List[Any]:
        """Every process's `obj`, in rank order (RNG states for the checkpoint)."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Give every process process 0's buffers (batch-norm running statistics).

        DDP broadcasts them only at the start of each training forward; each
        process then updates its own copy from its own last batch, so after
        training the copies differ. Evaluation must use one network on every
        shard, and that network must be the one the checkpoint saves:
        process 0's.
        """
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_from_environment(use_cuda: bool) -> DistContext:
    """Join the process group torchrun describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, world, local_rank)


def shutdown(context: DistContext) -> None:
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(n: int, context: DistContext, pad: bool) -> torch.Tensor:
    """This process's indices of 0..n-1, interleaved by rank.

    With `pad`, the list is first wrapped around to a multiple of the world
    size (as DistributedSampler does), so every process runs the same number
    of training steps; without it, the shards partition 0..n-1 exactly, as
    the NC statistics need.
    """
    index = torch.arange(n)
    if pad and n % context.world:
        index = torch.cat([index, index[:context.world - n % context.world]])
    return index[context.rank::context.world]
