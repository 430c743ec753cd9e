"""Where an eager ``lsq_fake_quant`` forward+backward spends its host time, per backend, on one kernel-benchmark case.

The kernel benchmark's "eager" column is host-bound wherever the host needs longer than the GPU to issue a call
(its CUDA-graph column is the GPU's time alone). This profiles eager calls with the PyTorch profiler (CPU and
CUDA activities) and writes, per backend, the ops by self CPU time and the GPU kernels, so the gap can be placed:
our Python, Triton's launcher, the custom-op dispatch or the autograd engine.

    python benchmarks/tools/profile_op.py --out bench_out --case "last axis" --dtype bf16 [--backends triton cuda]
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

import gaqat_kernels as gk

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/: the harness
from bench_kernels import CASES, DTYPES, make_inputs  # noqa: E402


def profile_backend(backend: str, shape, axis, dtype, bits: int, calls: int) -> tuple:
    """``(host ms per call, the profiler's table)`` of ``calls`` eager forward+backward calls after a warm-up.
    Host time: issuing the calls without waiting for the GPU (launches are asynchronous and ``calls`` is far below
    the launch queue's depth), unprofiled."""
    s, sets = make_inputs(shape, axis, dtype, bits, True, 2)

    def step(i):
        x, dy = sets[i % len(sets)]
        y = gk.lsq_fake_quant(x, s, bits=bits, signed=True, axis=axis, backend=backend)
        torch.autograd.grad(y, (x, s), dy)

    for i in range(10):
        step(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(calls):
        step(i)
    host_ms = (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for i in range(calls):
            step(i)
        torch.cuda.synchronize()
    return host_ms, prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--case", default="last axis", help="a kernel-benchmark case whose name contains this")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    args = ap.parse_args(argv)
    matches = [c for c in CASES if args.case in c[0]]
    if len(matches) != 1:
        ap.error(f"--case {args.case!r} must name one case of {[c[0] for c in CASES]}, matched {len(matches)}")
    name, shape, axis = matches[0]
    os.makedirs(args.out, exist_ok=True)
    for backend in args.backends:
        if backend not in gk.available_backends():
            print(f"{backend}: not available here, skipped", flush=True)
            continue
        host_ms, table = profile_backend(backend, shape, axis, DTYPES[args.dtype], args.bits, args.calls)
        slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
        path = os.path.join(args.out, f"profile_{slug}_{args.dtype}_{backend}.txt")
        with open(path, "w") as f:
            f.write(f"{name}, {args.dtype}, {args.bits} bits, backend {backend}: host {host_ms:.3f} ms per eager "
                    f"fwd+bwd call; profile of {args.calls} calls\n")
            f.write(table)
        print(f"{name} {args.dtype} {backend}: host {host_ms:.3f} ms per eager fwd+bwd call; table in {path}",
              flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("profile_op.py needs a CUDA GPU")
    main()
