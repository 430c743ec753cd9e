"""Does Inductor keep the per-channel scale gradient free of full-size temporaries? Compiles one activation
quantizer (by default the decomposed lowering; ``--lowering`` picks another), then ReLU, as in a network, and
lists, per generated graph (forward, backward), every buffer it allocates and every kernel it launches.

    python benchmarks/tools/inductor_buffers.py [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--shape 64 128 28 28] \
        [--lowering decomposed|triton_backward|custom_op]

A full-size buffer that is neither an output (y, dx) nor a saved mask is a temporary the fused kernels avoid;
several kernels over the full size in one backward mean x and dy are read more than once.
"""
from __future__ import annotations

import argparse
import re

import torch
from torch._inductor.utils import run_and_get_code

import gaqat_kernels as gk

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def generated_code(device: str, dtype: torch.dtype, shape, axis: int, bits: int, lowering: str = "decomposed"):
    """Inductor's code for a forward and backward of ``relu(lsq_fake_quant(x, s))`` with a per-channel scale."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    scale = torch.full((shape[axis],), 0.1, device=device).requires_grad_()

    def f(a, b):
        return torch.relu(gk.lsq_fake_quant(a, b, bits=bits, signed=True, axis=axis))

    compiled = torch.compile(f, fullgraph=True)

    def step():
        y = compiled(x, scale)
        y.backward(torch.ones_like(y))

    with gk.ops.compile_lowering(lowering):
        _, codes = run_and_get_code(step)
    return codes


def summarize(code: str):
    """(buffers as (name, shape, dtype), kernel names) allocated / launched by one generated module."""
    buffers = re.findall(r"(buf\d+) = empty_strided_\w+\(\(([^)]*)\), \([^)]*\), (torch\.\w+)", code)
    kernels = sorted(set(re.findall(r"\b((?:cpp|triton)_\w+?)(?:\.run)?\(", code)) - {"cpp_fused"})
    kernels += sorted(set(re.findall(r"\b(_\w+_kernel_\d+)\.run\(", code)))  # user-defined: our Triton kernels
    return buffers, [k for k in kernels if not k.startswith("triton_helpers") and k != "cpp_pybinding"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--shape", type=int, nargs="+", default=[64, 128, 28, 28])
    p.add_argument("--axis", type=int, default=1)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--lowering", default="decomposed", choices=gk.ops.COMPILE_LOWERINGS)
    args = p.parse_args()
    torch._dynamo.reset()
    codes = generated_code(args.device, DTYPES[args.dtype], tuple(args.shape), args.axis, args.bits, args.lowering)
    full = ", ".join(str(n) for n in args.shape)
    print(f"device {args.device}, {args.dtype}, shape {tuple(args.shape)}, axis {args.axis}, lowering {args.lowering}, "
          f"torch {torch.__version__}")
    for name, code in zip(("forward", "backward"), codes):
        buffers, kernels = summarize(code)
        print(f"{name}: {len(kernels)} kernel(s): {', '.join(kernels)}")
        for buf, shape, dtype in buffers:
            size = "full size" if shape.rstrip(", ") == full else "small"
            print(f"  {buf}: ({shape}) {dtype} [{size}]")


if __name__ == "__main__":
    main()
