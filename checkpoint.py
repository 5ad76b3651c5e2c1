"""What a checkpoint holds, and putting it back, so that a resumed run is bit-identical.

Besides model, optimiser and scheduler, every random stream is saved: Python's,
numpy's global one, torch's CPU and CUDA defaults, and the run's own data,
pairing and lambda generators, for every process of a torchrun job.
"""
from __future__ import annotations

import random

import numpy as np
import torch

CHECKPOINT_FORMAT = 1


def _local_rng_state(run) -> dict:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()  # plain ints: loadable with weights_only
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch_cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "data": run.generators.data.get_state(),
        "pairs": run.generators.pairs.get_state(),
        "lam": run.generators.lam.bit_generator.state,
    }


def capture_state(run, epoch: int) -> dict:
    """The full training state after `epoch` (a collective call under torchrun)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "world_size": run.dist.world,
        "device_type": run.device.type,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": run.dist.gather(_local_rng_state(run)),
        "history": list(run.history),
    }


def detached_copy(value):
    """A copy of a captured state that later training steps cannot change: tensors copied to the host.

    state_dict() returns the live parameter and momentum tensors, which the next
    step updates in place; everything else capture_state builds afresh.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: detached_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detached_copy(item) for item in value)
    return value


def restore_state(run, state: dict) -> int:
    """Load `state` into the run; returns the epoch it was taken after."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    _follow_the_current_schedule(run.scheduler)
    rng = state["rng"][run.dist.rank]
    random.setstate(_as_tuple(rng["python"]))
    numpy_state = dict(rng["numpy"])
    numpy_state["state"] = dict(numpy_state["state"], key=np.asarray(numpy_state["state"]["key"], dtype=np.uint32))
    np.random.set_state(numpy_state)
    torch.set_rng_state(rng["torch_cpu"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    run.generators.data.set_state(rng["data"])
    run.generators.pairs.set_state(rng["pairs"])
    run.generators.lam.bit_generator.state = rng["lam"]
    run.history[:] = [record for record in state["history"] if record["epoch"] <= state["epoch"]]
    return state["epoch"]


def _follow_the_current_schedule(scheduler) -> None:
    """Set each group's rate from this run's schedule at the restored epoch.

    The optimizer state restores the rate the saved run's schedule set, and
    LambdaLR.load_state_dict does not recompute it; a run extended with a
    larger --epochs must train its next epoch at the new schedule's rate.
    """
    for group, base_lr, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * factor(scheduler.last_epoch)


def saved_device_type(state: dict) -> str:
    """The device type whose random generators the checkpoint holds (older checkpoints: from the state size)."""
    if "device_type" in state:
        return state["device_type"]
    cpu_state_size = torch.Generator().get_state().numel()  # a CUDA generator's state is 16 bytes
    return "cpu" if state["rng"][0]["data"].numel() == cpu_state_size else "cuda"


def _as_tuple(value):
    """random.setstate wants tuples where a round trip may have produced lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
