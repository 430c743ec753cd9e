"""CPU benchmark: the C++ backend against the eager reference and eager LSQ, forward+backward, on this machine.

    python benchmarks/bench_cpu.py [--threads N]

Prints a markdown table (median of repeated runs, ms) with the speed-up of the ``cpu`` backend, and the
``cpu`` backend at each instruction-set level its loops are compiled for (the highest runs by default).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import gaqat_kernels as gk
from gaqat_kernels.kernels import extension
from gaqat_kernels.kernels.reference import lsq_fake_quant_eager

CASES = [
    ("conv weight 256x256x3x3 per-channel", (256, 256, 3, 3), 0),
    ("conv weight 256x256x3x3 per input channel (axis 1)", (256, 256, 3, 3), 1),
    ("weight 1024x1024 per-channel", (1024, 1024), 0),
    ("weight 1024x1024 per-channel, last axis", (1024, 1024), 1),
    ("act 16x64x56x56 per-tensor", (16, 64, 56, 56), None),
    ("act 16x64x56x56 per-channel (axis 1)", (16, 64, 56, 56), 1),
]


def median_ms(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if "cpu" not in gk.available_backends():
        raise SystemExit("the cpu backend is not built")
    levels = extension.CPU_ISA_LEVELS
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"cpu backend levels {levels} (default {extension.MODULE.cpu_isa()})\n")
    print("| case | dtype | eager LSQ ms | reference ms | " + " | ".join(f"cpu {lv} ms" for lv in levels)
          + " | cpu speed-up vs reference / eager |")
    print("|---|---|---|---|" + "---|" * len(levels) + "---|")
    for name, shape, axis in CASES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype).requires_grad_()
            c = 1 if axis is None else shape[axis]
            s = (torch.rand(c) * 0.5 + 0.1).requires_grad_()
            dy = torch.randn(shape).to(dtype)
            impls = {
                "eager": lambda: lsq_fake_quant_eager(x, s, bits=4, signed=True, axis=axis),
                "reference": lambda: gk.lsq_fake_quant(x, s, bits=4, signed=True, axis=axis, backend="reference"),
            }
            t = {k: median_ms(lambda f=f: torch.autograd.grad(f(), (x, s), dy), args.repeat) for k, f in impls.items()}

            def cpu():
                return torch.autograd.grad(gk.lsq_fake_quant(x, s, bits=4, signed=True, axis=axis, backend="cpu"),
                                           (x, s), dy)
            for level in levels:
                with extension.cpu_isa(level):
                    t[level] = median_ms(cpu, args.repeat)
            best = t[extension.MODULE.cpu_isa()]
            print(f"| {name} | {str(dtype)[6:]} | {t['eager']:.2f} | {t['reference']:.2f} | "
                  + " | ".join(f"{t[lv]:.2f}" for lv in levels)
                  + f" | {t['reference'] / best:.1f}× / {t['eager'] / best:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
