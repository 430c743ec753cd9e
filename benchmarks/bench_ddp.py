"""Data-parallel scaling of a GAQAT training step: images/s on 1 GPU against N GPUs.

ResNet-50 (torchvision layout, random weights), W4A4 LSQ (first conv and last linear in full precision),
GAQAT (SAM's two passes + the conflict tracker, whose statistics are all-reduced), SGD, batch 64 per GPU at
224x224, under DistributedDataParallel. The inputs are random tensors of the real shape (a synthetic
stand-in: the step's cost does not depend on pixel values). Run it once per GPU count:

    torchrun --standalone --nproc_per_node=1 benchmarks/bench_ddp.py --out bench_out
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_ddp.py --out bench_out

Rank 0 appends one JSON line per run to ``--out/ddp.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from bench_conflict import commit_id  # benchmarks/ is on the path when this runs as a script
from gaqat_kernels.algorithms import build_algorithm
from gaqat_kernels.distributed import init_from_env, shutdown
from gaqat_kernels.models import build_model
from gaqat_kernels.nn import initialize_quantizers, quantize_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=64, help="per GPU")
    p.add_argument("--classes", type=int, default=345, help="DomainNet's 345 classes")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=15, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    ctx = init_from_env("cuda")
    torch.manual_seed(0)
    model = build_model(args.arch, (3, 224, 224), args.classes).to(ctx.device)
    gen = torch.Generator(device=ctx.device).manual_seed(1 + ctx.rank)
    x = torch.randn(args.batch, 3, 224, 224, device=ctx.device, generator=gen)
    y = torch.randint(0, args.classes, (args.batch,), device=ctx.device, generator=gen)
    quantize_model(model, 4, 4, unsigned_inputs=[], backend=args.backend)
    initialize_quantizers(model, x, combine=ctx.average_)
    alg = build_algorithm("gaqat", model, base_optimizer=torch.optim.SGD, lr=0.01, momentum=0.9, rho=0.05,
                          backend=args.backend)
    net = ctx.wrap(model)

    def closure():
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(args.warmup):
        alg.step(closure)
    times = []
    for _ in range(args.rounds):
        torch.cuda.synchronize()
        ctx.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            alg.step(closure)
        torch.cuda.synchronize()
        ctx.barrier()
        times.append((time.perf_counter() - start) / args.steps)
    step_s = statistics.median(times)
    if ctx.is_main:
        commit = commit_id()
        row = {"arch": args.arch, "gpus": ctx.world_size, "batch_per_gpu": args.batch, "step_ms": step_s * 1e3,
               "images_per_s": ctx.world_size * args.batch / step_s, "rounds_ms": [t * 1e3 for t in times],
               "device": torch.cuda.get_device_name(ctx.device), "torch": torch.__version__, "commit": commit,
               "process_group": dist.get_backend() if ctx.enabled else None,
               "peak_mem_gib": torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30}
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ddp.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
    shutdown()


if __name__ == "__main__":
    main()
