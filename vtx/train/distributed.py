"""Distributed data parallel for the training loop, as launched by ``torchrun``.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE > 1``) each process trains on its shard of
the data: gloo on the CPU, nccl on CUDA with one GPU per process (``cuda:LOCAL_RANK``). Rank 0
validates and writes the run files, then shares its decisions with :func:`broadcast`. Outside
torchrun every helper here is a no-op, so the training loop reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from vtx.errors import UsageError

__all__ = ["Dist", "all_mean", "broadcast", "data_parallel", "epoch_seed", "has_unused_parameters",
           "init_distributed"]


@dataclass
class Dist:
    """This process's place in the run.

    Attributes:
        world: number of processes (1 outside torchrun).
        rank: this process's rank (0 writes the files).
        local_rank: its rank on this node (its GPU index on CUDA).
        owns_group: :func:`init_distributed` started the process group, so :meth:`close` ends it.
    """

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """End the process group if this process started it."""
        if self.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def init_distributed(device_opt: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (if ``WORLD_SIZE > 1``) and pick this process's device.

    Args:
        device_opt: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; under DDP on CUDA the device is
            ``cuda:LOCAL_RANK`` whatever the index given.

    Raises:
        UsageError: more processes on this node than CUDA devices.
    """
    import torch.distributed as dist

    from vtx.pipeline.backbones import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_opt)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_opt)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                             f"device(s); start at most that many processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    return Dist(world, dist.get_rank(), local, owns), device


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch's dropout on one rank: distinct per rank, and the same when a run
    is resumed, so a resumed run retraces an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2**63


def all_mean(d: Dist, total: float, count: int, device: torch.device) -> float:
    """``sum(total) / sum(count)`` over all ranks (``total / count`` on one process)."""
    if not d.enabled:
        return total / max(count, 1)
    import torch.distributed as dist
    t = torch.tensor([total, float(count)], dtype=torch.float64,
                     device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp_min(1))


def broadcast(d: Dist, obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself on one process); ``obj`` must pickle."""
    if not d.enabled:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def has_unused_parameters(module: nn.Module, inputs) -> bool:
    """Whether some trainable parameter of ``module`` gets no gradient from ``module(inputs)``
    (DDP must then look for them).

    VTN's last layer, for one, computes frame outputs nobody reads. Probed with one backward
    pass; gradients are cleared and the CPU RNG state is restored afterwards.
    """
    state = torch.get_rng_state()
    module.zero_grad(set_to_none=True)
    module(inputs).float().sum().backward()
    unused = any(p.grad is None for p in module.parameters() if p.requires_grad)
    module.zero_grad(set_to_none=True)
    torch.set_rng_state(state)
    return unused


def data_parallel(module: nn.Module, device: torch.device, probe_inputs) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel on ``device``; ``probe_inputs`` (one small
    batch) tells whether it has parameters without gradients."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=has_unused_parameters(module, probe_inputs))
