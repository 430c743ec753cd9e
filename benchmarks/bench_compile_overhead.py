"""Host time per quantizer call inside a torch.compile'd forward+backward, on tensors too small to matter.

A compiled graph calls each of our ops through the dispatcher; what that call costs on the host is what
small layers pay per step. Side by side in one run, per available backend:

    python benchmarks/bench_compile_overhead.py [--device cpu|cuda] [--layers 32] [--backends cpu "cpu python-op"]

Prints microseconds per quantizer call (forward + backward), median of repeated timed steps; "eager-lsq" is
the composed eager formula compiled by Inductor (no op boundary at all), for comparison.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gaqat_kernels as gk
from gaqat_kernels.kernels.reference import lsq_fake_quant_eager


def chain(backend: str):
    """``backend`` of ours; "eager-lsq": the composed eager ops, which Inductor fuses into its own kernels;
    "<backend> python-op": that backend through the Python custom op (how cpu/cuda were traced before their
    C++ operators)."""
    def quant(x, s):
        if backend == "eager-lsq":
            return lsq_fake_quant_eager(x, s, bits=4, signed=True)
        if backend.endswith(" python-op"):
            return torch.ops.gaqat_kernels.lsq_fake_quant(x, s, 4, True, None, None, backend.split()[0])
        return gk.lsq_fake_quant(x, s, bits=4, signed=True, axis=None, backend=backend)

    def f(x, scales):
        for s in scales:
            x = quant(x, s) * 1.01
        return x.sum()
    return f


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--backends", nargs="+", default=None)
    args = ap.parse_args()
    runs_here = {"cpu": ("reference", "cpu"), "cuda": ("reference", "triton", "cuda")}[args.device]
    ours = [b for b in gk.available_backends() if b in runs_here]
    ext = [b for b in ("cpu", "cuda") if b in ours]
    names = args.backends or ["eager-lsq"] + ours + [f"{b} python-op" for b in ext]
    torch._dynamo.config.cache_size_limit = 64
    print(f"device {args.device}, torch {torch.__version__}, {args.layers} quantizers, 16 elements each")
    for backend in names:
        x = torch.randn(16, device=args.device, requires_grad=True)
        scales = [torch.full((1,), 0.1, device=args.device, requires_grad=True) for _ in range(args.layers)]
        step = torch.compile(chain(backend), fullgraph=True)

        def run():
            loss = step(x, scales)
            loss.backward()
            if args.device == "cuda":
                torch.cuda.synchronize()

        for _ in range(5):
            run()
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        us = statistics.median(times) * 1e6 / args.layers
        print(f"  {backend:16s} {us:7.1f} us per quantizer call (forward + backward)", flush=True)


if __name__ == "__main__":
    main()
