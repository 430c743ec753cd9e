"""Recomputed against stored quantized inputs, one configuration: step time (graph and eager) and a
torch.profiler table of the eager step per implementation, on a CUDA GPU.

    python benchmarks/tools/profile_train_step.py --model resnet50 --precision bf16 --algorithm erm

Uses bench_train_step's models and steps; prints the tables (top kernels by GPU time, top ops by host time).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the harness
from bench_train_step import build, make_step, measure  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--algorithm", default="erm", choices=["erm", "sam", "gaqat"])
    p.add_argument("--impls", nargs="+", default=["cuda", "cuda_stored"])
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    for mode in ("graph", "eager"):
        for impl in args.impls:
            r = measure((args.model, impl, args.algorithm, args.precision, mode), 3, 5, 5)
            print(f"{mode} {impl}: {r['ms']:.2f} ms/step, peak {r['peak_gib']:.2f} GiB", flush=True)
    for impl in args.impls:
        model, x, y = build(args.model, impl, 64)
        step = make_step(model, x, y, args.algorithm, args.precision, "eager")
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        print(f"===== {impl}: {args.steps} eager steps")
        table = prof.key_averages()
        print(table.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
        print(table.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
        del model, step


if __name__ == "__main__":
    main()
