"""Running under ``torchrun``: the process group, this rank's device, and the few collectives training needs.

torchrun sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``. Without them (or with one process) the context is
a single process and every helper here does nothing, so the training script has one code path.

Data parallelism follows one rule: every rank draws the same global batch indices and trains on its own
slice, and DistributedDataParallel averages the gradients, so N ranks with batch B take the step one
process takes with batch N * B (up to floating-point summation order).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistributedContext:
    """Who this process is: ``rank`` of ``world_size``, on ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """Whether more than one process trains (collectives are no-ops otherwise)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and results."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` inside DistributedDataParallel (parameters broadcast from rank 0), or itself alone."""
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def average_(self, tensors: Sequence[Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place (one all-reduce for all of them)."""
        tensors = list(tensors)
        if not self.enabled or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.mul_(1.0 / self.world_size)
        with torch.no_grad():
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(part.view_as(t))

    def sum_(self, tensor: Tensor) -> Tensor:
        """All-reduce ``tensor`` by sum in place (on this rank's device, as NCCL needs) and return it."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def common_names(self, names: Sequence[str]) -> List[str]:
        """The names every rank has, in this rank's order (one small host-side exchange)."""
        if not self.enabled:
            return list(names)
        gathered: List[Optional[List[str]]] = [None] * self.world_size
        dist.all_gather_object(gathered, list(names))
        common = set(gathered[0]).intersection(*map(set, gathered[1:]))
        return [n for n in names if n in common]

    def barrier(self) -> None:
        """Wait for every rank (nothing with one process)."""
        if self.enabled:
            dist.barrier()


def init_from_env(device: Optional[str] = None, backend: Optional[str] = None) -> DistributedContext:
    """The context torchrun's environment describes; initialises the default process group when N > 1.

    Args:
        device: "cuda", "cpu" or None (cuda when available). With N > 1 and CUDA, rank r uses its local GPU
            ``cuda:LOCAL_RANK``.
        backend: process-group backend; None: "nccl" on GPUs, "gloo" on CPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world <= 1:
        return DistributedContext(device=dev)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank}: only {torch.cuda.device_count()} GPUs are visible")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # torch.distributed.nn.functional binds ``group=group.WORLD`` as default arguments when imported: imported
        # while a group exists (torch._dynamo imports it, and DDP's constructor imports torch._dynamo), its ten
        # functions keep the group, destroy_process_group cannot free it, and its gloo threads are torn down at
        # interpreter exit instead, where a rank can abort ("terminate called without an active exception").
        importlib.import_module("torch._dynamo")
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                              device=dev)


def shutdown(wait_for_peers: bool = True) -> None:
    """Destroy the default process group if this process created one.

    ``wait_for_peers``: a barrier first, so that no rank tears the group down while a peer still uses it. Pass
    False on an error path, where a peer may never arrive. The group is freed here only if nothing else holds it
    (see ``init_from_env``); a group freed at interpreter exit instead can abort the process there.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
