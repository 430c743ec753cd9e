"""Runs the CUDA and Triton kernels (LSQ and the conflict tracker) on odd sizes and layouts; meant to be run
under compute-sanitizer. The CUDA backend runs each case with its looping backward blocks prefetching and not (``extension.cuda_launch``).

    compute-sanitizer --tool memcheck python benchmarks/tools/sanitize_cuda.py
"""
import contextlib

import torch

import gaqat_kernels as gk
from gaqat_kernels.kernels.extension import cuda_launch

CASES = [((1,), None), ((7, 33), 0), ((5, 3, 4, 7), 1), ((3, 2001), 0), ((300, 1100), 0), ((4099,), None),
         ((600, 8), 1), ((2, 513, 3), 1), ((13, 4100), -1), ((3, 4096), 0), ((2, 20000), 0),
         ((3, 2, 2048), 1), ((37, 264), 1), ((4_400_008,), None)]  # the last: per-tensor blocks that loop over many tiles


def main():
    runs = [(b, contextlib.nullcontext) for b in ("cuda", "triton") if b in gk.available_backends()]
    if "cuda" in gk.available_backends():
        runs.append(("cuda", lambda: cuda_launch(prefetch=True)))
    for backend, setting in runs:
        with setting():
            run_cases(backend)
    for backend in ("cuda", "triton"):
        if backend in gk.available_backends():
            run_tracker(backend)
    torch.cuda.synchronize()
    print("sanitize_cuda: all cases ran")


def run_cases(backend):
    """Forward and backward of every case, dtype and alignment on ``backend``."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for shape, axis in CASES:
            for offset in (0, 1):  # offset 1: a misaligned view, forcing the scalar paths
                n = 1
                for d in shape:
                    n *= d
                base = torch.randn(n + offset, device="cuda").to(dtype)
                x = base[offset:].view(shape).requires_grad_()
                c = 1 if axis is None else shape[axis]
                s = (torch.rand(c, device="cuda") + 0.1).requires_grad_()
                y = gk.lsq_fake_quant(x, s, bits=4, signed=True, axis=axis, backend=backend)
                y.backward(torch.randn_like(y))


def run_tracker(backend):
    """Tracker steps with every freezing rule, empty and long segments, and a top-k cap (the last block's pass)."""
    from gaqat_kernels.algorithms import ConflictTracker

    sizes = [0, 1, 3000, 7, 0, 513] * 30
    for rule in ("absolute", "zscore", "ratio"):
        for cap in (None, 5):
            tracker = ConflictTracker(sizes, device="cuda", backend=backend, rule=rule, max_frozen=cap)
            for _ in range(3):
                tracker.update(torch.randn(sum(sizes), device="cuda"), torch.randn(sum(sizes), device="cuda"))


if __name__ == "__main__":
    main()
