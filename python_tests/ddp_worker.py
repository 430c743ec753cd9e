"""One process of the distributed GAQAT/FQAT test (python_tests/test_distributed.py), run by torchrun or alone.

Trains a small fully quantized conv net on scikit-learn's digits (real data) for a few SAM steps under
DistributedDataParallel and saves, per rank, every step's freeze mask and statistics and the final state.
Alone (one process) with an N-times larger batch it takes the same steps, which the test checks.

    python ddp_worker.py OUT_DIR ALGORITHM BATCH_PER_RANK STEPS DEVICE THRESHOLD
    (ALGORITHM "tracker": only a ConflictTracker fed different gradients on each rank)
"""
import json
import os
import sys

import torch
from torch import nn

from gaqat_kernels.algorithms import ConflictTracker, build_algorithm
from gaqat_kernels.data import DomainBatches, rotated_digits
from gaqat_kernels.distributed import DistributedContext, init_from_env, shutdown
from gaqat_kernels.nn import initialize_quantizers, quantize_model


def comm_threads() -> list:
    """Names of this process's native gloo threads (Linux), which live as long as a gloo process group does."""
    if not os.path.isdir("/proc/self/task"):
        return []
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


def shutdown_and_record(out: str, rank: int) -> None:
    """Destroy the group, then record the gloo threads left: none, or the group was not freed and its threads
    would be torn down at interpreter exit."""
    shutdown()
    with open(f"{out}/rank{rank}_threads.json", "w") as f:
        json.dump(comm_threads(), f)


def tracker_only(ctx: DistributedContext, out: str, steps: int) -> None:
    """Each rank feeds its *own* gradients: the tracker must still end with one mask on every rank."""
    gen = torch.Generator().manual_seed(100 + ctx.rank)
    shared, local = (ConflictTracker([3, 5, 4, 6], device=ctx.device, threshold=0.3, decay=0.5, sync_ranks=sync)
                     for sync in (None, False))
    masks, stats, local_masks = [], [], []
    for _ in range(steps):
        task, smooth = (torch.randn(18, generator=gen).to(ctx.device) for _ in range(2))
        if ctx.device.type == "cuda":  # the all-reduce and the mask decision must not wait for the GPU
            torch.cuda.set_sync_debug_mode("error")
        mask = shared.update(task, smooth)
        if ctx.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        masks.append(mask.cpu().clone())
        stats.append(shared.stats.cpu().clone())
        local_masks.append(local.update(task, smooth).cpu().clone())
    torch.save({"masks": torch.stack(masks), "stats": torch.stack(stats), "local_masks": torch.stack(local_masks)},
               f"{out}/rank{ctx.rank}.pt")


def train(ctx: DistributedContext, out: str, algorithm: str, batch: int, steps: int, threshold: float) -> None:
    torch.backends.cudnn.allow_tf32 = False  # the 1-process comparison needs fp32 convolutions
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    model.to(ctx.device)
    quantize_model(model, 4, 4, keep_first_last=False, unsigned_inputs=["2", "6", "8"])
    data = rotated_digits()
    batches = DomainBatches(data.domains, batch, ctx.device, seed=1, workers=0, rank=ctx.rank,
                            world_size=ctx.world_size)
    first = batches.next()
    initialize_quantizers(model, torch.cat([x for x, _ in first]), combine=ctx.average_)
    alg = build_algorithm(algorithm, model, base_optimizer=torch.optim.SGD, lr=0.05, rho=0.05, threshold=threshold,
                          decay=0.5, max_frozen_fraction=0.5 if algorithm == "fqat" else None)
    net = ctx.wrap(model)
    masks, stats = [], []
    minibatches = first
    for _ in range(steps):
        x = torch.cat([b[0] for b in minibatches])
        y = torch.cat([b[1] for b in minibatches])

        def closure():
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        alg.step(closure)
        masks.append(alg.tracker.state.frozen.cpu().clone())
        stats.append(alg.tracker.stats.cpu().clone())
        minibatches = batches.next()
    torch.save({"masks": torch.stack(masks), "stats": torch.stack(stats),
                "state": {k: v.cpu() for k, v in model.state_dict().items()}, "world_size": ctx.world_size},
               f"{out}/rank{ctx.rank}.pt")


if __name__ == "__main__":
    out, algorithm, batch, steps, device, threshold = sys.argv[1:7]
    context = init_from_env(device)
    if algorithm == "tracker":
        tracker_only(context, out, int(steps))
    else:
        train(context, out, algorithm, int(batch), int(steps), float(threshold))
    shutdown_and_record(out, context.rank)  # after the DDP model and the algorithm are gone, as in train.run
